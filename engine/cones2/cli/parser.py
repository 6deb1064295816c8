"""The argparse parser every cones2 command line uses (`cones2-engine`, `cones2-train`, the demo trainer).

Three changes from argparse: a value such as `-1e8`, `-2.5e-3` or `-inf` is read as a number, not as an
unknown flag (`--negative-weight -1e8` works); a bad flag is reported in one line, exit 2; and an
unknown flag after a subcommand points to that subcommand's help (`cones2-engine generate --help`).
"""
from __future__ import annotations

import argparse
import re

# argparse's own matcher knows `-1` and `-.5` but not exponents or infinities
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser reading negative numbers in exponent form, with one-line errors.
    Subcommand parsers made with `add_subparsers().add_parser` are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._innermost(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _innermost(self, parsed) -> "argparse.ArgumentParser":
        """The (sub)command parser that read the last subcommand in `parsed`."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if isinstance(chosen, ArgumentParser):
                    return chosen._innermost(parsed)
        return self

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
