"""No folder or module at the repository root shadows an installed distribution (issue 23).

`kernels`, `engine`, `export`, `bench` and `tests` are all real PyPI names, and `transformers` >= 5.25
imports the `kernels` distribution. Whenever the root is on sys.path (`python -m pytest`, `python -c`,
a notebook, Ray workers), a root folder with an `__init__.py` would win over the installed package.
The rule is by construction (docs/architecture.md, below the import table): no root folder but our own `cones2_train` is a
regular package, and no root file is a module; these tests check it and its consequence, from the root.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from ci_support import import_or_skip

ROOT = Path(__file__).resolve().parents[1]
# Root entries that are this project's own import names: importing them from the root gives the same
# package the install provides, so they shadow nothing.
OWN_PACKAGES = {"cones2_train"}


def _root_import_names() -> dict[str, Path]:
    """Every name the root would offer to `import` when it is on sys.path."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.is_symlink():
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def _run_from_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root as working directory (so '' heads sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONES2_DEFAULT_MODEL")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_root_folder_is_a_regular_package_and_no_root_file_is_a_module():
    offenders = []
    for name, path in _root_import_names().items():
        if name in OWN_PACKAGES:
            continue
        if path.is_file():
            offenders.append(f"{path.name} (a module named {name!r})")
        elif (path / "__init__.py").exists():
            offenders.append(f"{name}/__init__.py (a package named {name!r})")
    assert not offenders, ("these root entries are importable as top-level packages when the root is on "
                           f"sys.path and would shadow any distribution of that name: {offenders}")


def test_installed_distributions_win_over_root_folders():
    """For each root name that an installed distribution provides, importing it from the root gets the
    installed package, not the folder."""
    provided = importlib.metadata.packages_distributions()
    ours = {"cones2-engine", "cones2_engine"}
    clashing = sorted(n for n in _root_import_names()
                      if n not in OWN_PACKAGES and set(provided.get(n, [])) - ours)
    import_or_skip("kernels", "the `kernels` distribution (required by transformers >= 5.25) is not installed")
    assert "kernels" in clashing, "the `kernels` distribution is installed, so this check must cover it"
    code = ("import importlib.util, json, sys\n"
            f"names = {clashing!r}\n"
            "print(json.dumps({n: importlib.util.find_spec(n).origin for n in names}))")
    run = _run_from_root(code)
    assert run.returncode == 0, run.stderr[-2000:]
    origins = json.loads(run.stdout.strip().splitlines()[-1])
    shadowed = {n: o for n, o in origins.items() if o is None or Path(o).resolve().is_relative_to(ROOT / n)}
    assert not shadowed, f"from the repository root these names resolve into the repository: {shadowed}"


def test_engine_builds_from_the_repository_root_with_the_real_kernels_installed():
    """The report of issue 23, as a user runs it: `python -c` in the root, the embedded model, and the
    diffusers / transformers classes that import `kernels`."""
    import_or_skip("kernels", "the `kernels` distribution (required by transformers >= 5.25) is not installed")
    code = (
        "import json, kernels, cones2\n"
        "engine = cones2.Engine.from_pretrained(None)\n"
        "from diffusers import AutoencoderKL\n"
        "from transformers import CLIPTextModel\n"
        "import cones2.kernels.triton_rectified, cones2.export.backends\n"
        "print(json.dumps({'kernels': kernels.__file__, 'vae': type(engine.vae).__name__,\n"
        "                  'clip': CLIPTextModel.__name__, 'ae': AutoencoderKL.__name__}))"
    )
    run = _run_from_root(code)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert not Path(seen["kernels"]).resolve().is_relative_to(ROOT / "kernels"), seen
    assert seen["vae"] == "AutoencoderKL"
