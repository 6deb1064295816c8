"""`cones2-engine` command line: one module per subcommand, each with `register(subparsers)`.

User mistakes (Cones2Error, bad flags, unwritable outputs) print one line and exit 2; Ctrl-C exits
130 (`exit_codes.run_cli`, shared with `cones2-train`).
"""
from __future__ import annotations

import importlib
import sys

from .exit_codes import run_cli
from .parser import ArgumentParser

SUBCOMMANDS = ["generate", "info", "serve", "client", "export"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cones2-engine", description="Cones 2 multi-subject, layout-guided generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":  # subcommand not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"cones2-engine {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
