"""The benchmark scripts in bench/, run as a user runs them (subprocesses: tests never import bench/):
the attention microbenchmark reports every backend with real, consistent numbers, and a one-step
bench/latency.py run writes every section. Speed itself is reported, not tested."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ci_support import import_or_skip  # noqa: E402


def _require_triton() -> None:
    import_or_skip("triton", "triton is not installed")


IMPLS = {"sdpa plain (baseline)", "reference guided (fp32 scores)", "sdpa guided (bias mask)",
         "triton guided (total)", "  triton std pre-pass", "  triton fused kernel"}


def test_tiny_attention_benchmark_reports_every_backend(tmp_path):
    _require_triton()
    out = tmp_path / "attn.json"
    cmd = [sys.executable, str(REPO / "bench" / "attention_bench.py"), "--tiny", "--backends", "reference,sdpa,triton",
           "--warmup", "1", "--repeat", "2", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == {} and result["meta"]["backends"] == ["reference", "sdpa", "triton"]
    rows = result["attention"]
    shapes = {(r["n"], r["heads"], r["dim"]) for r in rows}
    assert shapes == {(144, 2, 32), (64, 2, 16)}
    for shape in shapes:
        here = {r["impl"]: r for r in rows if (r["n"], r["heads"], r["dim"]) == shape}
        assert set(here) == IMPLS, shape
        baseline = here["sdpa plain (baseline)"]["min_ms"]
        for r in here.values():
            assert math.isfinite(r["min_ms"]) and 0 < r["min_ms"] <= r["median_ms"] < math.inf, r
            assert r["runs"] >= 1 and r["timer"], r
            assert r["ratio_vs_sdpa_plain"] == pytest.approx(r["min_ms"] / baseline, rel=1e-9), r
            assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0, r
        # the interpreted Triton kernel is orders of magnitude slower than SDPA: the rows are really timed
        assert here["triton guided (total)"]["ratio_vs_sdpa_plain"] > 10
    assert "triton fused kernel" in run.stdout and "ratio" in run.stdout


def test_attention_benchmark_rejects_unknown_backend(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "attention_bench.py"), "--tiny", "--backends", "sdpa,fast"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert run.returncode == 2 and "fast" in run.stderr


def test_kernel_numerics_script_on_the_interpreter(tmp_path):
    """bench/kernel_numerics.py (the GPU check's numerics step) on its tiny CPU shape: every dtype,
    the Triton kernel and the engine's reference within tolerance, hard masks exactly 0."""
    _require_triton()
    cmd = [sys.executable, str(REPO / "bench" / "kernel_numerics.py"), "--tiny", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads((tmp_path / "numerics.json").read_text())
    assert record["command"].startswith("python bench/kernel_numerics.py --tiny")   # bench/harness/results.py
    result = record["payload"]
    assert result["ok"] is True and "cuda" in result["skipped"]
    rows = {(r["impl"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {(i, d) for i in ("triton", "reference") for d in ("fp32", "fp16", "bf16")}
    for r in rows.values():
        assert 0 <= r["max_abs_err"] <= r["atol"] and r["finite"] and r["allowed_positive"], r
        assert r["hard_masked"] > 100 and r["hard_mask_nonzero"] == 0, r
    assert rows["triton", "fp32"]["max_abs_err"] < 1e-5 and rows["triton", "fp32"]["std_ok"]


@pytest.mark.integration   # a whole bench/latency.py run with its attention sweep up to 9216 queries: ~20 s idle
def test_one_step_latency_run_writes_every_section(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "latency.py"), "--model", str(tiny_model_dir), "--steps", "1",
           "--warmup", "0", "--repeat", "1", "--backends", "reference,sdpa", "--no-progress", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["backend"] for r in result["end_to_end"]} == {"reference", "sdpa", "paper-style"}
    assert any(r["stage"] == "VAE decode" for r in result["stages"])
    assert {r["n"] for r in result["attention"]} == {9216, 2304, 576, 144}
    for r in result["attention"] + result["end_to_end"]:
        assert math.isfinite(r["min_ms"]) and r["min_ms"] > 0, r
    assert "speedup" in run.stdout and "ratio" in run.stdout
    bad = subprocess.run(cmd[:2] + ["--subjects", "9", "--model", str(tiny_model_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and "subjects" in bad.stderr


_GRAPH_BREAK = """
import runpy, sys
import torch
import cones2.compiled
from cones2.attention.backends import SdpaBackend
from cones2.backends import ATTENTION, BackendSpec, register


class GraphBreakBackend(SdpaBackend):
    # sdpa with a graph break in every plain call: what an op this torch cannot trace looks like
    name = "graph-break"

    def plain(self, q, k, v, scale):
        torch._dynamo.graph_break()
        return super().plain(q, k, v, scale)


register(BackendSpec("graph-break", ATTENTION, GraphBreakBackend, "test backend: breaks the graph",
                     traceable=True))   # traced, so dynamo meets the break
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.integration   # a bench/latency.py process with a torch.compile attempt: ~13 s idle
def test_latency_compile_falls_back_to_eager_on_a_graph_break(tmp_path, tiny_model_dir):
    """A graph break under fullgraph=True (as a GPU's torch may hit) does not lose the run: bench/latency.py
    logs why, measures eager, and its JSON says that compile was asked for and what happened."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-c", _GRAPH_BREAK, str(REPO / "bench" / "latency.py"), "--model", str(tiny_model_dir),
           "--device", "cpu", "--resolution", "64", "--steps", "1", "--warmup", "0", "--repeat", "1",
           "--backends", "graph-break", "--compile", "--compiler", "aot_eager", "--no-attention", "--no-progress",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--compile falls back to eager: backend graph-break: Unsupported" in run.stderr
    meta = json.loads(out.read_text())["meta"]
    assert meta["compile"] is False and meta["compile_requested"] is True
    assert meta["compile_fallback"].startswith("backend graph-break: Unsupported")
    assert {r["backend"] for r in json.loads(out.read_text())["end_to_end"]} == {"graph-break", "paper-style"}
