"""`bench/gpu_check.sh --dry-run`: every step of the GPU check runs here on the CPU with tiny shapes
(the install from a freshly built wheel, the closure check, the CMake configure, the numerics on the
interpreter, the gpu-marked tests' collection, the three latency runs with the compiled one through
torch.compile), so the script that meets a GPU has run end to end before. And its budget plumbing:
a step that has no time left is recorded as skipped, and the run fails."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["environment", "install", "cuda-build", "numerics", "pytest-gpu", "latency-fast-compiled", "latency-fast",
         "latency-paper-exact"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ci_support import import_or_skip  # noqa: E402


def _run(*args, env: dict | None = None, timeout: int = 2100) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh ARGS with this interpreter, the `sdpa` backend pinned, no carried wheels."""
    env = {**os.environ, "PYTHON": sys.executable, "CONES2_BACKEND": "sdpa", **(env or {})}
    env.pop("GPU_CHECK_WHEELS", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.integration
def test_dry_run_runs_every_step_end_to_end(tmp_path):
    """The dry run (conftest points the default model at the tiny one) passes every step, writes the
    results as it goes, and the compiled latency step really compiled (torch.compile, aot_eager).
    `integration` (make test-integration, run by CI after make test): eight steps, seven of them a
    fresh interpreter importing torch, a wheel build and a torch.compile trace; about 70 s idle."""
    import_or_skip("triton", "triton is not installed")
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    run = _run("--dry-run", out, bundle)
    summary = json.loads((out / "summary.json").read_text())
    assert run.returncode == 0, (run.stdout[-3000:], summary)
    assert summary["ok"] is True and summary["dry_run"] is True and summary["failed"] == []
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == STEPS
    cuda_tools = shutil.which("nvcc") and shutil.which("cmake")
    for name, s in steps.items():
        if name == "cuda-build" and not cuda_tools:
            assert s["status"] == "skipped", s
            continue
        assert s["status"] == "ok" and s["rc"] == 0 and s["timeout_s"] > 0, s
        assert (out / f"{name}.log").is_file()
    assert "cones2 from" in (out / "install.log").read_text() and "0 problems" in (out / "install.log").read_text()
    assert "/site/cones2/" in (out / "install.log").read_text()      # the installed wheel, not the source tree
    assert (out / "pip-freeze.txt").read_text().count("==") > 10
    assert json.loads((out / "numerics.json").read_text())["payload"]["ok"] is True   # a results record
    compiled = json.loads((out / "latency_fast_compiled.json").read_text())
    assert compiled["meta"]["compile"] is True and compiled["meta"]["mode"] == "fast"
    assert compiled["meta"]["compile_s"]["sdpa"] > 0 and "compile_fallback" not in compiled["meta"]
    for name in ("latency_fast", "latency_paper_exact"):
        rows = json.loads((out / f"{name}.json").read_text())["end_to_end"]
        assert rows and all(r["min_ms"] > 0 for r in rows)
    assert {p.name for p in bundle.iterdir()} == {"summary.json", "gpu_check.log", "gpu_check.tar.gz"}
    assert json.loads((bundle / "summary.json").read_text()) == summary


def test_a_step_without_budget_is_skipped_and_fails_the_run(tmp_path):
    """No time left: every step is recorded as skipped (nothing runs), summary.json says which, exit 1."""
    run = _run("--dry-run", tmp_path, env={"GPU_CHECK_BUDGET_S": "5", "GPU_CHECK_COMPILED_S": "0"}, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["failed"] == STEPS
    assert all(s["status"] == "skipped" and "budget" in s["log"] for s in summary["steps"])


def test_usage_errors_exit_2(tmp_path):
    for args in ([], ["--bogus", tmp_path], [tmp_path, tmp_path, "extra"]):
        run = _run(*args, timeout=60)
        assert run.returncode == 2 and "usage" in run.stderr
