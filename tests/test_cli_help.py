"""Issue 26, item 7: help texts are clean: every flag explained, one default each, no "(default:
None)"; an unknown flag points to the subcommand's own help."""
from __future__ import annotations

import argparse
import re

import pytest

from cli_support import cli
from cones2.cli import build_parser
from cones2_train.cli import build_parser as build_train_parser

MINE = ("generate", "info", "export")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _parsers():
    subs = dict(_subparsers(build_parser()))
    found = [(name, subs[name]) for name in MINE if name in subs]
    for name, parser in list(found):
        found += [(f"{name} {n}", p) for n, p in _subparsers(parser)]
    return found + [("cones2-train", build_train_parser())]


@pytest.mark.parametrize("name,parser", _parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_is_explained_once(name, parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.option_strings}: no help"
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        shown = parser._get_formatter()._expand_help(action) if action.help else ""
        assert len(re.findall(r"\bdefault\b", shown)) <= 1, f"{name} {action.option_strings}: {shown}"


def test_unknown_flag_points_to_the_subcommand_help():
    proc = cli("info", "--nope")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("cones2-engine info: error: unrecognized arguments: --nope "
                                   "(see cones2-engine info --help)")
