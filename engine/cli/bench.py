"""`cones2-engine bench`: the latency profile of `bench/latency.py` (logic in `cones2.benchmark`)."""
from __future__ import annotations


def register(sub) -> None:
    from ..benchmark import add_arguments

    p = sub.add_parser("bench", help="profile stages, guided attention and generation on this device")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..benchmark import run as run_benchmark

    return run_benchmark(args)
