"""The CPU default (`sdpa` since issue 29) and `onnxruntime`'s export, made on first use and cached per
model when it is named without `onnx_dir`.

Its numerics against the independent SPEC reference are in tests/test_engine_vs_reference.py (the
`onnxruntime` rows); here: that the default exports nothing, that a named `onnxruntime` exports once
and finds it again, that the cache key follows the weights, and that a default which cannot start
gives way to its fallback.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import cones2
from ci_support import import_or_skip

import_or_skip("onnxruntime", "the CPU default needs the export extra")
import_or_skip("onnxscript", "the CPU default needs the export extra")

from cones2 import backends  # noqa: E402
from cones2.export import cache  # noqa: E402


@pytest.fixture
def unpinned(monkeypatch):
    """The suite pins the default to sdpa (conftest); these tests look at the real default."""
    monkeypatch.delenv("CONES2_BACKEND", raising=False)


def _count_exports(monkeypatch) -> list:
    """Record every export the cache starts (it imports `export_engine` when it needs one)."""
    from cones2.export import onnx_export

    calls, original = [], onnx_export.export_engine

    def counting(engine, out_dir, **kw):
        calls.append(out_dir)
        return original(engine, out_dir, **kw)

    monkeypatch.setattr(onnx_export, "export_engine", counting)
    return calls


def test_the_cpu_default_is_sdpa_and_exports_nothing(unpinned, tiny_model_dir, monkeypatch):
    def cached() -> set:
        return set((cones2.cache_root() / "onnx").glob("*"))

    calls, before = _count_exports(monkeypatch), cached()
    engine = cones2.Engine.from_pretrained(tiny_model_dir)
    assert (engine.default_backend, engine.backend_reason) == ("sdpa", "default on cpu")
    assert calls == [] and cached() == before


@pytest.mark.integration   # the only test of the cached (fused) export: ~50 s idle, opt-in since issue 29
def test_onnxruntime_exports_once_and_finds_it_again(tiny_model_dir, monkeypatch, caplog):
    first = cones2.Engine.from_pretrained(tiny_model_dir, backend="onnxruntime")
    assert (first.default_backend, first.backend_reason) == ("onnxruntime", "requested")
    folder = cache.cached_export_dir(first)
    assert (folder / "manifest.json").is_file() and folder.parent == cones2.cache_root() / "onnx"
    # the UNet's plain attention is fused into ONNX Runtime's MultiHeadAttention; TensorRT refuses it
    import json

    import onnx

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnxruntime_only"] is True and manifest["models"]["unet"]["ort_fusions"]
    ops = {n.op_type for n in onnx.load(str(folder / "unet.onnx"), load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops and not any(p.name.startswith("unfused") for p in folder.iterdir())
    from cones2.export.trt_build import build_engines

    with pytest.raises(cones2.Cones2Error, match="^onnx: .* holds graphs fused for ONNX Runtime"):
        build_engines(folder, folder.parent / "trt")

    calls = _count_exports(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = cones2.Engine.from_pretrained(tiny_model_dir, backend="onnxruntime")
    assert second.default_backend == "onnxruntime" and calls == []          # the cached graphs, no export
    assert "exporting" not in caplog.text

    layout = cones2.Layout.from_boxes({"dog": (0.0, 0.0, 0.5, 1.0), "mug": (0.5, 0.2, 1.0, 0.9)})
    kw = dict(seed=2, steps=3, height=64, width=128, progress=False)
    got = second.generate("a dog and a mug", None, layout, **kw)
    exact = second.generate("a dog and a mug", None, layout, backend="reference", **kw)
    assert got.backend == "onnxruntime"
    err = (got.latents - exact.latents).abs().max().item()
    assert err <= 1e-4 * max(1.0, exact.latents.abs().max().item()), err


def test_the_cache_key_follows_the_weights(tiny_model_dir):
    engine = cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa")
    before = cache.cached_export_dir(engine)
    assert cache.cached_export_dir(engine) == before                       # stable
    param = next(engine.unet.parameters())
    with torch.no_grad():
        param.view(-1)[0] += 1e-3
    assert cache.cached_export_dir(engine) != before                       # a retrained model: a new export


def test_a_default_that_cannot_start_gives_way_to_sdpa(unpinned, tiny_model_dir, monkeypatch, caplog):
    def broken(engine, progress=None):
        raise RuntimeError("exporter crashed\nlong trace")

    # onnxruntime made the CPU default again (as it was before issue 29), its export failing
    preferred = dataclasses.replace(backends.get_spec("onnxruntime"), default_on=("cpu",), priority=15)
    monkeypatch.setitem(backends._SPECS, "onnxruntime", preferred)
    monkeypatch.setattr(cache, "ensure_cached_export", broken)
    with caplog.at_level(logging.WARNING, logger="cones2.engine"):
        engine = cones2.Engine.from_pretrained(tiny_model_dir)
    assert (engine.default_backend, engine.backend_reason) == ("sdpa", "default on cpu (onnxruntime could not start)")
    assert "default backend onnxruntime could not start (RuntimeError: exporter crashed); using sdpa" in caplog.text


def test_compile_picks_the_best_attention_backend(unpinned, tiny_model_dir):
    engine = cones2.Engine.from_pretrained(tiny_model_dir, compile=True)
    assert engine.default_backend == "sdpa"


def test_the_cached_export_needs_a_cpu_fp32_engine(tiny_model_dir):
    engine = cones2.Engine.from_pretrained(tiny_model_dir, dtype="bf16", backend="sdpa")
    with pytest.raises(cones2.Cones2Error, match="backend_options.onnx_dir: the cached ONNX export is made from a "
                                                 "CPU fp32 engine, this one is cpu bfloat16"):
        cache.ensure_cached_export(engine)


@pytest.mark.slow
def test_two_processes_starting_at_once_export_once(tiny_model_dir, tmp_path):
    """Service workers start together: the file lock lets one export while the other waits, then
    both run the same cached graphs."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys, cones2; logging.basicConfig(level=logging.WARNING); "
            "e = cones2.Engine.from_pretrained(sys.argv[1]); print('backend', e.default_backend)")
    env = os.environ | {"CONES2_BACKEND": "onnxruntime", "CONES2_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert all("backend onnxruntime" in out for out, _ in outs)
    assert sum("exporting" in err for _, err in outs) == 1, [err[-500:] for _, err in outs]
    assert len([d for d in (tmp_path / "onnx").iterdir() if not d.name.startswith(".")]) == 1
