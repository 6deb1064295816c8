"""The house rules of docs/architecture.md's import table, enforced over the source tree with `ast`.

kernels/ is a leaf (torch, triton, the standard library); the engine core (engine/cones2 without
serve/ and cli/) never imports serve, export, bench or training, not even by an importlib string; the
service uses only the public engine API; nothing imports bench/.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# engine/ is a src-layout root (engine/cones2 is the package); kernels/ and export/ are its namespace
# subpackages (docs/architecture.md, below the import table).
PACKAGE_OF_FOLDER = {"engine/cones2": "cones2", "kernels": "cones2.kernels", "export": "cones2.export",
                     "cones2_train": "cones2_train", "tests": "tests"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# What the service may use of the engine: the names `cones2/__init__.py` exports, and the small
# public helper modules (errors, value bounds, atomic writes, threads, the backend registry).
SERVE_MAY_IMPORT = {"cones2", "cones2.errors", "cones2.limits", "cones2.atomic", "cones2.threads", "cones2.backends"}
OUTSIDE_CORE = ("cones2.serve", "cones2.cli", "cones2.export", "cones2_train", "bench", "harness")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    depth = 2 if rel.parts[0] == "engine" else 1
    parts = [PACKAGE_OF_FOLDER["/".join(rel.parts[:depth])], *rel.parts[depth:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.append(prefix)
            found += [f"{prefix}.{a.name}" for a in node.names]  # `from pkg import module`
    return found


def strings_of(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def sources(folder: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    return [p for p in files if not any(p.relative_to(ROOT).as_posix().startswith(e) for e in exclude)]


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_module_names_resolve_like_the_installed_package():
    assert module_name(ROOT / "engine" / "cones2" / "serve" / "server.py") == "cones2.serve.server"
    assert module_name(ROOT / "kernels" / "triton_rectified.py") == "cones2.kernels.triton_rectified"
    assert "cones2.serve.cones2_pb2" in imports_of(ROOT / "engine" / "cones2" / "serve" / "server.py")


def test_kernels_are_a_leaf():
    bad = {}
    for path in sources("kernels"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in ("torch", "triton") or top in STDLIB or _within(name, ["cones2.kernels"]):
                continue
            bad.setdefault(path.name, []).append(name)
    assert not bad, f"kernels/ may import only torch, triton and the standard library: {bad}"


@pytest.mark.parametrize("path", sources("engine", exclude=("engine/cones2/serve/", "engine/cones2/cli/")), ids=lambda p: p.name)
def test_engine_core_never_reaches_outward(path):
    imported = [n for n in imports_of(path) if _within(n, OUTSIDE_CORE)]
    assert not imported, f"{path.relative_to(ROOT)} imports {imported}"
    named = [s for s in strings_of(path) if any(s == m or s.startswith(m + ".") or s.startswith(m + ":")
                                                  for m in OUTSIDE_CORE)]
    assert not named, f"{path.relative_to(ROOT)} names {named} in a string (an importlib import?)"


def test_service_uses_only_the_public_engine_api():
    bad = {}
    for path in sources("engine/cones2/serve"):
        for name in imports_of(path):
            if name.startswith("cones2") and not _within(name, ["cones2.serve"]) and name not in SERVE_MAY_IMPORT:
                if "." in name and name.rsplit(".", 1)[0] in SERVE_MAY_IMPORT:
                    continue  # `from cones2 import Engine` lists "cones2.Engine" too
                bad.setdefault(path.name, []).append(name)
    assert not bad, f"the service imports private engine modules: {bad}"


def test_nothing_imports_bench():
    bad = {}
    for folder in ("engine", "kernels", "export", "cones2_train", "tests"):
        for path in sources(folder):
            hits = [n for n in imports_of(path) if _within(n, ["bench", "harness"])]
            hits += [s for s in strings_of(path) if "spec_from_file_location" in s]
            if "spec_from_file_location" in path.read_text():
                hits.append("importlib.util.spec_from_file_location")
            if hits:
                bad[str(path.relative_to(ROOT))] = hits
    bad.pop("tests/test_import_graph.py", None)  # this file names the function it forbids
    assert not bad, f"bench/ is scripts, not a library: {bad}"
