"""`cones2-engine` command line: one module per subcommand, each with `register(subparsers)`.

User mistakes (Cones2Error, bad flags) print one line and exit 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import Cones2Error

SUBCOMMANDS = ["generate", "info", "serve", "client", "export", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cones2-engine", description="Cones 2 multi-subject, layout-guided generation.")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Cones2Error as exc:
        print(f"cones2-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cones2-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
