"""The engine with backend="triton" (fused kernel under TRITON_INTERPRET=1) matches backend="reference"
on the tiny model, and the backend says clearly where it cannot run. (Which backend is the CPU default
is tested with the suite's sdpa pin removed: tests/test_cpu_default.py, tests/test_backend_registry.py.)"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ci_support import import_or_skip  # noqa: E402

import_or_skip("triton", "the triton backend needs the [triton] extra")
import cones2  # noqa: E402
from cones2.attention.triton_backend import TritonBackend  # noqa: E402

torch.set_num_threads(1)
PROMPT = "a dog and a mug on the beach"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return cones2.Engine.from_pretrained(tiny_model_dir, backend="triton")


def test_triton_engine_matches_reference(engine, monkeypatch):
    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.35, 0.5, 0.95), "mug": (0.55, 0.45, 0.95, 0.95)})
    settings = dict(layout=layout, steps=2, guidance_steps=1, seed=3, height=128, width=128, progress=False)
    backend = engine.runner("triton").backend
    assert isinstance(backend, TritonBackend)
    calls = []
    kernel = backend._kernel
    monkeypatch.setattr(backend, "_kernel", lambda *a: calls.append(a[0].shape) or kernel(*a))

    fused = engine.generate(PROMPT, backend="triton", **settings)
    literal = engine.generate(PROMPT, backend="reference", **settings)
    torch.testing.assert_close(fused.latents, literal.latents, atol=1e-4, rtol=1e-4)
    assert {shape[2] for shape in calls} == {16 * 16, 8 * 8, 4 * 4}      # every cross-attention level

    # The guidance is visible at this tolerance, so the comparison above could fail.
    unguided = engine.generate(PROMPT, backend="reference", **{**settings, "layout": None})
    assert (unguided.latents - literal.latents).abs().max() > 1e-2


def test_kernel_argument_errors_become_cones2_errors_at_the_seam(engine):
    """kernels/ is a leaf with its own ValueError; the engine's attention seam names the backend."""
    backend = engine.runner("triton").backend
    q = torch.randn(1, 2, 16, 8)
    kv = torch.randn(1, 2, 77, 8)
    with pytest.raises(cones2.Cones2Error) as err:
        backend.cross(q, kv, kv, torch.zeros(1, 15, 77), torch.ones(1), 8 ** -0.5)   # weight has 15 rows, q 16
    assert err.value.field == "backend.triton" and "\n" not in str(err.value)
