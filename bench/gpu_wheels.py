#!/usr/bin/env python
"""The wheels `bench/gpu_check.sh` carries to a GPU machine that has no registry: the closure.

The GPU machine brings torch, Triton, NVIDIA's packages and whatever torch itself requires (torch
does not import without them); everything else that the check imports - this project, its
dependencies, pytest - must come in `.whl/`. `list` walks the requirements of ROOTS through the
installed distributions here (markers and extras evaluated) and prints the closure as name==version,
minus what the GPU machine brings; `make gpu-wheels` downloads exactly those. `check` verifies, on
the target machine after the install, that every requirement of the closure is met (name, version,
markers), one line per problem, so a missing wheel stops the run at the install step and not three
steps later.

    python bench/gpu_wheels.py list cones2-engine pytest        # here: what to download
    python bench/gpu_wheels.py list --present freeze.txt        # minus what the target has (its pip freeze)
    python bench/gpu_wheels.py check cones2-engine pytest       # there: is the closure complete?
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("cones2-engine", "pytest")
BROUGHT = ("torch", "triton")          # the GPU machine's own; with them, their own requirements
BROUGHT_PREFIXES = ("nvidia-", "cuda-")   # NVIDIA's packages (nvidia-cublas, cuda-bindings, ...)


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: metadata.Distribution, extras: frozenset[str]) -> list:
    """The `packaging` Requirement objects `dist` needs with `extras` on this interpreter."""
    from packaging.requirements import Requirement

    needed = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            needed.append(req)
    return needed


def is_brought(name: str) -> bool:
    """torch, Triton or one of NVIDIA's packages: the GPU machine's own."""
    return name in BROUGHT or name.startswith(BROUGHT_PREFIXES)


def walk(roots: list[str], specifiers: dict | None = None,
         leaves: bool = False) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """({canonical name: installed distribution} of the roots' closure, [problems]). A problem is a
    requirement with no installed distribution, or one whose version does not satisfy it.
    specifiers: if given, collects {canonical name: [SpecifierSet, ...]} of every requirement met.
    leaves: do not look into what the GPU machine's own packages require (its image's business)."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    problems: list[str] = []
    specifiers = {} if specifiers is None else specifiers
    queue = [(Requirement(r), "(root)") for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        req, parent = queue.pop()
        name, extras = canonical(req.name), frozenset(req.extras)
        specifiers.setdefault(name, []).append(req.specifier)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (required by {parent}: {req})")
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req.name}: {dist.version} installed, {parent} requires {req}")
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found[name] = dist
        if not (leaves and is_brought(name)):
            queue += [(r, f"{name} {dist.version}") for r in requirements(dist, extras)]
    return found, problems


def brought(roots_found: dict[str, metadata.Distribution]) -> set[str]:
    """Names the GPU machine brings itself: torch, Triton, NVIDIA's, and torch's and Triton's closure."""
    names = {n for n in roots_found if is_brought(n)}
    present = [n for n in BROUGHT if n in roots_found]
    if present:
        names |= set(walk(present)[0])
    return names


def present_on_target(path: Path, specifiers: dict) -> set[str]:
    """Names that `pip freeze` output from the target machine (name==version lines) already has at a
    version every requirement accepts: those need not be carried."""
    have = set()
    for line in path.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and all(s.contains(version.strip(), prereleases=True) for s in specifiers.get(canonical(name), [])):
            have.add(canonical(name))
    return have


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_wheels.py", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("list", "check"))
    p.add_argument("roots", nargs="*", default=list(ROOTS), help=f"distributions (default: {' '.join(ROOTS)})")
    p.add_argument("--present", type=Path, default=None,
                   help="list: `pip freeze` of the target machine; what it has at a fitting version is left out")
    args = p.parse_args(argv)
    specifiers: dict = {}
    found, problems = walk(args.roots, specifiers, leaves=True)
    if args.action == "check":
        for line in problems:
            print(f"gpu_wheels: {line}", file=sys.stderr)
        print(f"closure of {' '.join(args.roots)}: {len(found)} distributions, {len(problems)} problems")
        return 1 if problems else 0
    if problems:   # here the closure must be complete: it is what gets downloaded
        print("\n".join(f"gpu_wheels: {line}" for line in problems), file=sys.stderr)
        return 1
    skip = brought(found) | {canonical(r) for r in args.roots if canonical(r) == "cones2-engine"}
    if args.present is not None:
        skip |= present_on_target(args.present, specifiers)
    print("\n".join(f"{found[n].metadata['Name']}=={found[n].version}" for n in sorted(found) if n not in skip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
