"""The compiled UNet runner (`Engine(..., compile=True)`, engine/cones2/compiled.py) on the CPU (inductor):
it computes what the eager runner computes, and new prompts, residuals and layouts never recompile.

Compiling the tiny UNet with inductor costs 1-2 minutes of C++ compilation per pair of graphs on a
small CPU (10 s with a warm inductor cache), so the default suite checks tracing and recompilation
with dynamo's "aot_eager" backend and the inductor runs of every exact backend are `slow`.
"""
from __future__ import annotations

import pytest
import torch

import cones2
from cones2.backends import attention_backend
from cones2.compiled import CompiledUNetRunner, OpaqueBackend

PROMPT = "a dog and a mug on the beach"
SETTINGS = dict(height=64, width=64, steps=2, guidance_steps=1, progress=False)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _requests(dim: int):
    """Three generations that differ in everything but shape: prompt, residuals, layout, weights, seed, mode."""
    gen = torch.Generator().manual_seed(0)
    return [
        dict(prompt=PROMPT, subjects={"dog": cones2.Residual(0.5 * torch.randn(1, dim, generator=gen))},
             layout=cones2.Layout.from_boxes({"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}), seed=1),
        dict(prompt="a mug next to a cat", subjects={"cat": cones2.Residual(torch.randn(1, dim, generator=gen))},
             layout=cones2.Layout.from_boxes({"cat": (0.0, 0.0, 0.6, 0.6)}, {"cat": 3.0}), seed=2,
             guidance_weight=0.05),
        dict(prompt="a cat and a dog", subjects={"cat": cones2.Residual(torch.randn(1, dim, generator=gen)),
                                                  "dog": cones2.Residual(torch.randn(1, dim, generator=gen))},
             layout=cones2.Layout.from_boxes({"cat": (0.5, 0.0, 1.0, 1.0), "dog": (0.0, 0.2, 0.45, 0.9)}), seed=3,
             mode="fast", cfg_scale=5.0),
    ]


def _generate(engine, req):
    req = dict(req)
    return engine.generate(req.pop("prompt"), req.pop("subjects"), req.pop("layout"), **req, **SETTINGS).latents


def _check_equal_and_no_recompiles(tiny_model_dir, tiny_engine):
    compiled = cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa", compile=True)
    assert isinstance(compiled.runner(), CompiledUNetRunner)
    before = _graphs()
    spent = compiled.warmup(resolutions=[64], batch_sizes=[1])
    assert list(spent) == [(64, 64, 1)] and spent[(64, 64, 1)] > 0
    warm = _graphs()
    assert warm == before + 2                      # the guided and the unguided UNet call: two graphs
    for req in _requests(tiny_engine.text_dim):
        got, want = _generate(compiled, req), _generate(tiny_engine, req)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert _graphs() == warm, "a new prompt, residual or layout recompiled the UNet"


def test_traced_sdpa_equals_eager_and_never_recompiles(tiny_model_dir, tiny_engine, monkeypatch):
    """Dynamo's tracing and guards, which decide recompilation, without inductor's code generation
    (about 10 s instead of 1-2 minutes of C++ compilation on a small CPU)."""
    monkeypatch.setattr(cones2.compiled, "COMPILER", "aot_eager")
    _check_equal_and_no_recompiles(tiny_model_dir, tiny_engine)


@pytest.mark.slow
def test_compiled_sdpa_equals_eager_and_never_recompiles(tiny_model_dir, tiny_engine):
    """The real thing, inductor (90 s cold on the 2-core CI machine, 10 s with a warm inductor cache)."""
    _check_equal_and_no_recompiles(tiny_model_dir, tiny_engine)


def test_non_traceable_backends_run_as_opaque_ops(tiny_engine):
    runner = CompiledUNetRunner(tiny_engine.unet, "triton", "cpu")
    assert isinstance(runner.backend, OpaqueBackend) and runner.backend.name == "triton"
    assert not isinstance(CompiledUNetRunner(tiny_engine.unet, "sdpa", "cpu").backend, OpaqueBackend)
    # the ops compute the backend's math (eagerly here), laid out (B, N, H, d) like the Triton kernel's output
    q, k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    weight, coef = torch.randn(2, 16, 7), torch.tensor([0.1, 0.0])
    sdpa = attention_backend("sdpa")
    out = OpaqueBackend("sdpa").cross(q, k, v, weight, coef, 8 ** -0.5)
    torch.testing.assert_close(out, sdpa.cross(q, k, v, weight, coef, 8 ** -0.5))
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(OpaqueBackend("sdpa").plain(q, k, v, 0.3), sdpa.plain(q, k, v, 0.3))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_backend_equals_eager(backend, tiny_model_dir):
    if backend == "triton":
        pytest.importorskip("triton")
    eager = cones2.Engine.from_pretrained(tiny_model_dir, backend=backend)
    compiled = cones2.Engine.from_pretrained(tiny_model_dir, backend=backend, compile=True)
    reqs = _requests(eager.text_dim)
    graphs = None
    for req in reqs[:2]:
        torch.testing.assert_close(_generate(compiled, req), _generate(eager, req), rtol=1e-4, atol=1e-4)
        graphs = _graphs() if graphs is None else graphs
        assert _graphs() == graphs


def test_compile_flag(tiny_model_dir):
    from cones2.cli import build_parser
    from cones2.cli.common import check_model_flags

    for command in ("generate", "serve"):
        args = build_parser().parse_args([command, "--compile", "--model", str(tiny_model_dir)])
        assert check_model_flags(args)["compile"] is True
    args = build_parser().parse_args(["generate", "--model", str(tiny_model_dir)])
    assert check_model_flags(args)["compile"] is False
    pytest.importorskip("onnxruntime")
    args = build_parser().parse_args(["generate", "--compile", "--backend", "onnxruntime", "--onnx", "x"])
    with pytest.raises(cones2.Cones2Error, match="compile"):
        check_model_flags(args)
