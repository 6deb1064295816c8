"""The backend registry: one name space for attention backends and UNet runners, one selector that
says why it chose what it chose, and clear errors for names that do not exist or cannot run here."""
from __future__ import annotations

import logging

import pytest
import torch

import cones2
from cones2 import backends
from cones2.backends import ATTENTION, RUNNER, BackendSpec
from ci_support import import_or_skip


def test_both_kinds_are_registered_under_one_namespace():
    kinds = {s.name: s.kind for s in backends.specs()}
    assert {n: kinds[n] for n in ("reference", "sdpa", "triton")} == dict.fromkeys(("reference", "sdpa", "triton"),
                                                                                     ATTENTION)
    # found through the `cones2.backends` entry point of the installed distribution, not named by the core
    assert kinds["onnxruntime"] == RUNNER and kinds["tensorrt"] == RUNNER
    assert backends.get_spec("tensorrt").needs == ("engine_dir",)
    assert backends.get_spec("onnxruntime").default_on == ()   # opt-in since issue 29 (docs/speed.md section 4)


def test_cpu_default_is_sdpa_and_the_choice_is_logged(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would make triton runnable
    monkeypatch.delenv("CONES2_BACKEND", raising=False)     # the suite pins it (conftest)
    with caplog.at_level(logging.INFO, logger="cones2.backends"):
        name, reason = cones2.select_backend("cpu")
    assert (name, reason) == ("sdpa", "default on cpu")
    assert "backend sdpa: default on cpu" in caplog.text
    assert [n for n, _ in backends.default_backends("cpu")] == ["sdpa"]
    assert backends.default_backends("cpu", (ATTENTION,)) == [("sdpa", "default on cpu")]   # what --compile takes
    import dataclasses

    # a higher-priority default that cannot run here is passed over, and the reason says so
    preferred = dataclasses.replace(backends.get_spec("onnxruntime"), default_on=("cpu",), priority=15,
                                    unavailable=lambda device: "no onnx here")
    monkeypatch.setitem(backends._SPECS, "onnxruntime", preferred)
    assert cones2.select_backend("cpu") == ("sdpa", "default on cpu (passed over onnxruntime: no onnx here)")


def test_the_environment_pins_the_default(monkeypatch):
    monkeypatch.setenv("CONES2_BACKEND", "reference")
    assert cones2.select_backend("cpu") == ("reference", "$CONES2_BACKEND")
    assert cones2.select_backend("cpu", "sdpa") == ("sdpa", "requested")   # a request still wins
    monkeypatch.setenv("CONES2_BACKEND", "onnxruntime")   # compile takes attention backends only
    with pytest.raises(cones2.Cones2Error, match=r"^backend: \$CONES2_BACKEND='onnxruntime' is a UNet runner; "
                                                 r"here only attention backends apply"):
        backends.default_backends("cpu", (ATTENTION,))
    monkeypatch.setenv("CONES2_BACKEND", "tensorrt")
    with pytest.raises(cones2.Cones2Error, match=r"^backend: \$CONES2_BACKEND='tensorrt': 'tensorrt' cannot run on cpu"):
        cones2.select_backend("cpu")


def test_cuda_default_prefers_triton_and_says_why_it_passed_it_over(monkeypatch):
    import_or_skip("triton", "the triton backend needs the [triton] extra")
    monkeypatch.delenv("CONES2_BACKEND", raising=False)
    assert cones2.select_backend("cuda") == ("triton", "default on cuda")
    import dataclasses

    hidden = dataclasses.replace(backends.get_spec("triton"), unavailable=lambda device: "pretend it is missing")
    monkeypatch.setitem(backends._SPECS, "triton", hidden)
    name, reason = cones2.select_backend("cuda")
    assert name == "sdpa" and reason == "default on cuda (passed over triton: pretend it is missing)"


def test_requested_backend_that_cannot_run_names_the_reason_and_the_alternatives(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(cones2.Cones2Error) as err:
        cones2.select_backend("cpu", "tensorrt")
    assert str(err.value) == ("backend: 'tensorrt' cannot run on cpu: TensorRT engines run on CUDA only; "
                              "usable here: onnx, onnxruntime, reference, sdpa")
    with pytest.raises(cones2.Cones2Error, match=r"unknown backend 'xla'; choose from cuda, onnx, onnxruntime, "):
        cones2.select_backend("cpu", "xla")


def test_runner_options_are_checked_before_building():
    class FakeEngine:
        unet = None

    from cones2.runners import make_runner

    with pytest.raises(cones2.Cones2Error, match="backend 'tensorrt' needs engine_dir"):
        make_runner("tensorrt", FakeEngine())
    with pytest.raises(cones2.Cones2Error, match="attention backend 'sdpa' takes no options, got onnx_dir"):
        make_runner("sdpa", FakeEngine(), onnx_dir="x")


def test_a_registered_attention_backend_runs_inside_the_engine(tiny_engine):
    """The public seam a plugin (xformers, later) uses: register a spec, ask for it by name."""
    calls = {"cross": 0, "plain": 0}
    sdpa = backends.attention_backend("sdpa")

    class Counting:
        def plain(self, *a):
            calls["plain"] += 1
            return sdpa.plain(*a)

        def cross(self, *a):
            calls["cross"] += 1
            return sdpa.cross(*a)

    backends.register(BackendSpec("counting-test", ATTENTION, Counting, "test double"))
    try:
        layout = cones2.Layout.from_boxes({"dog": (0, 0, 0.5, 1)})
        got = tiny_engine.generate("a dog and a mug", None, layout, steps=2, height=64, width=64,
                                   backend="counting-test", progress=False)
        want = tiny_engine.generate("a dog and a mug", None, layout, steps=2, height=64, width=64, backend="sdpa",
                                    progress=False)
    finally:
        backends._SPECS.pop("counting-test")
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=0)
    from diffusers.models.attention_processor import Attention

    layers = [m for m in tiny_engine.unet.modules() if isinstance(m, Attention)]
    n_cross = sum(m.is_cross_attention for m in layers)
    # 2 steps, both guided with self-recurrence: 4 UNet calls; each cross-attention layer takes the
    # rectified path once per call, each self-attention layer the plain one
    assert calls == {"cross": 4 * n_cross, "plain": 4 * (len(layers) - n_cross)}
