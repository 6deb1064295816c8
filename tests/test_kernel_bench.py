"""bench/latency.py (cones2.benchmark): its paper-style baseline computes the same thing as the
batched path, backend selection explains itself, and a one-step run writes every section.
(No timing is asserted: speed is reported by the benchmark, not tested.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cones2 import Cones2Error
from cones2.attention import Rectification
from cones2.benchmark import UnbatchedCfgRunner, resolve_backends

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def test_unbatched_cfg_runner_matches_batched_reference(tiny_engine):
    runner = tiny_engine.runner("reference")
    x = torch.randn(4, 4, 16, 16)
    emb = torch.randn(4, 77, tiny_engine.text_dim)
    weights = {n: torch.randn(4, n, 77) for n in (256, 64, 16)}
    for w in weights.values():
        w[:, :, 3] = -1e8
    rect = Rectification(weights, torch.tensor([0.5, 0.2, 0.0, 0.0]))
    t = torch.tensor(700.0)
    batched = runner(x, t, emb, rect)
    split = UnbatchedCfgRunner(runner)(x, t, emb, rect)
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=1e-5)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    names, skipped = resolve_backends(None, cpu, None)
    assert names == ["reference", "sdpa"] and "CUDA" in skipped["triton"]
    names, skipped = resolve_backends("torch,triton,onnxruntime", cpu, None)
    assert names == ["sdpa"] and set(skipped) == {"triton", "onnxruntime"}
    with pytest.raises(Cones2Error) as err:
        resolve_backends("sdpa,fast", cpu, None)
    assert err.value.field == "backends"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backends("triton", cpu, None) == (["triton"], {})


def test_one_step_run_writes_every_section(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "latency.py"), "--model", str(tiny_model_dir), "--steps", "1",
           "--warmup", "0", "--repeat", "1", "--backends", "reference,sdpa", "--no-progress", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["backend"] for r in result["end_to_end"]} == {"reference", "sdpa", "paper-style"}
    assert any(r["stage"] == "VAE decode" for r in result["stages"])
    assert {r["n"] for r in result["attention"]} == {9216, 2304, 576, 144}
    assert "speedup" in run.stdout and "ratio" in run.stdout
    bad = subprocess.run(cmd[:2] + ["--subjects", "9", "--model", str(tiny_model_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and "subjects" in bad.stderr
