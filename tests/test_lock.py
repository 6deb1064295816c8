"""The lock (`constraints.txt`, made by `make lock`) is the complete set `make setup` installs (issue 23).

Every distribution that `cones2-engine[dev]` needs, directly or through any dependency, is pinned in the
lock; and where the suite runs from the locked install (`make test` sets CONES2_LOCKED=1), each one is
installed at exactly its pinned version. `make test-latest` runs without the lock, so there only the
first check applies.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "cones2-engine"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _closure(project: str, extras: set[str]) -> dict[str, str | None]:
    """Name -> installed version (None: not installed) of everything `project[extras]` requires,
    followed through the installed distributions' own metadata (markers evaluated for this
    interpreter)."""
    seen: dict[str, str] = {}
    todo = [(project, frozenset(extras))]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[canonicalize_name(name)] = None        # required, not installed here
            continue
        seen[canonicalize_name(name)] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [default_environment() | {"extra": e} for e in (wanted or {""})]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return seen


def test_every_needed_distribution_is_pinned():
    pins = _lock()
    needed = _closure(PROJECT, {"dev"})
    needed.pop(canonicalize_name(PROJECT))
    missing = sorted(n for n in needed if n not in pins)
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"
    assert pins["torch"].startswith("2.13.0"), "these machines carry the CPU wheel of torch 2.13.0 only"


def test_the_locked_install_has_exactly_the_pinned_versions():
    if os.environ.get("CONES2_LOCKED") != "1":
        pytest.skip("not the locked install (make test sets CONES2_LOCKED=1; make test-latest does not)")
    pins = _lock()
    needed = _closure(PROJECT, {"dev"})
    needed.pop(canonicalize_name(PROJECT))
    drift = {n: (v, pins.get(n)) for n, v in needed.items() if v != pins.get(n)}
    assert not drift, f"installed (version, pinned) differ from the lock; rerun `make setup`: {drift}"
