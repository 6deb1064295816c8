"""`fast` mode's work reuse (engine/cones2/reuse.py, issue 24 item 2): the shallow pass and the
cached cross-attention are checked against diffusers' own full UNet forward, the step plan against
hand-written schedules, and the deviation of the whole generation is bounded. A runner that cannot
reuse work (compiled, exported) takes the plan's plain passes and gives the same fast image."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from ci_support import import_or_skip

import cones2
from cones2.errors import Cones2Error
from cones2.reuse import FULL, SHALLOW, ReusingRunner, StepPlan

PROMPT = "a dog and a mug on the beach"
LAYOUT = {"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}
# guided CFG pairs, the CFG pass that records the cross-attention, a conditional-only tail with full and
# shallow passes (the defaults' tail is one full step since issue 24's residual judgement)
EVERY_PASS_KIND = dict(steps=10, guidance_steps=4, gate_step=5, cache_interval=2)


def test_step_plan_by_hand():
    plan = StepPlan.make(12, 4, 6, 2)
    passes = plan.unet_passes()
    assert passes == ([(i, True, FULL) for i in range(4) for _ in range(2)]
                      + [(4, True, FULL), (5, True, FULL), (6, False, FULL), (7, False, SHALLOW), (8, False, FULL),
                         (9, False, SHALLOW), (10, False, FULL), (11, False, SHALLOW)])
    assert [i for i in range(12) if plan.records_cross_attention(i)] == [5]
    assert [i for i in range(12) if plan.records_deep_features(i)] == [6, 8, 10]
    unguided_cache = StepPlan.make(8, 2, 8, 3)               # no tail; full every 3rd unguided step
    assert [d for _, _, d in unguided_cache.unet_passes()[4:]] == [FULL, SHALLOW, SHALLOW, FULL, SHALLOW, SHALLOW]
    assert not StepPlan.make(10, 10, 10, 1).reuses and StepPlan.make(10, 3, 0, 1).gate == 3   # gate >= G


def _inputs(engine, R=2):
    torch.manual_seed(0)
    x = torch.randn(2 * R, 4, 8, 8)
    emb = torch.cat([engine.encode([PROMPT] * R), engine.encode([""] * R)])
    return x, torch.tensor(700.0), emb


def test_shallow_pass_on_fresh_features_equals_the_full_unet(tiny_engine):
    """Kept features from a full pass at the same input: the shallow pass must give diffusers' own
    UNet output (it recomputes the outer blocks in the same order)."""
    runner = tiny_engine.runner()
    x, t, emb = _inputs(tiny_engine)
    reuse = ReusingRunner(runner, 2)
    full = reuse(x, t, emb, None, cfg=True, depth=FULL, record_cross=False, record_deep=True)
    stock = tiny_engine.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(full, stock, rtol=1e-5, atol=1e-5)
    shallow = reuse(x, t, emb, None, cfg=True, depth=SHALLOW, record_cross=False, record_deep=False)
    torch.testing.assert_close(shallow, stock, rtol=1e-5, atol=1e-5)
    x2 = x + 0.5 * torch.randn_like(x)                       # another input: shallow differs from full
    assert (reuse(x2, t, emb, None, cfg=True, depth=SHALLOW, record_cross=False, record_deep=False)
            - tiny_engine.unet(x2, t, encoder_hidden_states=emb).sample).abs().max() > 1e-3


def test_deep_features_are_kept_from_this_threads_pass_only(tiny_engine):
    """Two generations on one engine share its UNet: another thread's forward that runs while this
    pass's keeping hook is on the UNet (here: between the kept block and the end of the pass) must
    not replace the kept features. Without the thread check the other input's features are kept."""
    runner = tiny_engine.runner()
    x, t, emb = _inputs(tiny_engine)
    solo = ReusingRunner(runner, 2)
    solo(x, t, emb, None, cfg=True, depth=FULL, record_cross=False, record_deep=True)
    other = threading.Thread(target=lambda: tiny_engine.unet(x + 1.0, t, encoder_hidden_states=emb))

    def run_other_thread_once(*_):
        if not other.ident:
            other.start()
            other.join()

    late = tiny_engine.unet.up_blocks[-1].register_forward_hook(run_other_thread_once)
    try:
        shared = ReusingRunner(runner, 2)
        shared(x, t, emb, None, cfg=True, depth=FULL, record_cross=False, record_deep=True)
    finally:
        late.remove()
    assert other.ident and not other.is_alive()
    torch.testing.assert_close(shared.deep, solo.deep, rtol=0, atol=0)


def test_cached_cross_attention_replays_the_conditional_branch(tiny_engine):
    """Recorded on a CFG pass, replayed on a conditional-only pass at the same input: the output is
    the CFG pass's conditional half; embeddings handed to the replay pass are not read."""
    runner = tiny_engine.runner()
    x, t, emb = _inputs(tiny_engine)
    reuse = ReusingRunner(runner, 2)
    both = reuse(x, t, emb, None, cfg=True, depth=FULL, record_cross=True, record_deep=False)
    torch.testing.assert_close(both, tiny_engine.unet(x, t, encoder_hidden_states=emb).sample, rtol=1e-5, atol=1e-5)
    cond = reuse(x[:2], t, torch.zeros_like(emb[:2]), None, cfg=False, depth=FULL, record_cross=False,
                 record_deep=False)
    torch.testing.assert_close(cond, both[:2], rtol=1e-5, atol=1e-5)
    # and without a reuse context the wrapped processors are the engine's own (paper-exact unchanged)
    torch.testing.assert_close(runner(x, t, emb, None), both, rtol=0, atol=0)


def test_paper_exact_takes_no_reuse_setting():
    for field in ("gate_step", "cache_interval"):
        with pytest.raises(Cones2Error, match=field):
            cones2.SamplingConfig(mode="paper-exact", **{field: 2})
    with pytest.raises(Cones2Error, match="cache_interval"):
        cones2.SamplingConfig(mode="fast", cache_interval=0)
    c = cones2.SamplingConfig(mode="fast", steps=10, guidance_steps=4, gate_step=2)
    assert c.gate_step == 4                                  # clamped to the end of the guided window


def _relative_change(a, b):
    return ((a - b).norm() / b.norm()).item()


# measured on the tiny random model (seed 3): 0.308, 0.021, 0.309. The tail without the unconditional
# branch moves the latents of a random model far (CFG 7.5 no longer applies there); on the demo model
# the quality figures decide (docs/speed.md).
@pytest.mark.parametrize("knobs,bound", [(dict(gate_step=6), 0.4), (dict(cache_interval=2), 0.05),
                                         (dict(gate_step=6, cache_interval=2), 0.4)])
def test_reuse_deviation_is_bounded(tiny_engine, knobs, bound):
    """Each knob against the same fast run that reuses nothing (same steps, guided steps, seed): a
    bounded change of the final latents (relative L2), and a real one (the knob does something)."""
    layout = cones2.Layout.from_boxes(LAYOUT)
    kw = dict(mode="fast", steps=12, guidance_steps=4, height=64, width=64, seed=3, progress=False)
    base = tiny_engine.generate(PROMPT, None, layout, gate_step=12, cache_interval=1, **kw).latents
    ours = tiny_engine.generate(PROMPT, None, layout, **{"gate_step": 12, "cache_interval": 1, **knobs}, **kw).latents
    change = _relative_change(ours, base)
    print(f"{knobs}: relative change {change:.4f}")
    assert 1e-4 < change <= bound


class OpaqueRunner:
    """A UNet runner the sampler cannot reuse work on, as a compiled or exported one is (not a
    `TorchUNetRunner`, no modules): the eager `sdpa` runner behind a plain call, counting its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, sample, timestep, embeddings, rectification):
        self.calls += 1
        return self.inner(sample, timestep, embeddings, rectification)


def test_fast_on_a_runner_that_cannot_reuse_gives_the_same_image(tiny_engine, monkeypatch, caplog):
    """The runner takes the plain CFG passes (the 8 guided ones of a 10 / 4 / 5 / 2 plan, which has every
    kind of pass); the 6 that reuse work (step 4 records the cross-attention, steps 5-9 the conditional
    tail) run on the eager UNet with sdpa: the latents equal sdpa's own fast run bit for bit; one log
    line says so."""
    opaque = OpaqueRunner(tiny_engine.runner("sdpa"))
    monkeypatch.setitem(tiny_engine._runners, "opaque", opaque)
    layout = cones2.Layout.from_boxes(LAYOUT)
    kw = dict(mode="fast", height=64, width=64, seed=5, progress=False, **EVERY_PASS_KIND)
    ref = tiny_engine.generate(PROMPT, None, layout, backend="sdpa", **kw)
    with caplog.at_level(logging.INFO, logger="cones2.engine"):
        got = [tiny_engine.generate(PROMPT, None, layout, backend="opaque", **kw) for _ in range(2)]
    assert opaque.calls == 2 * 8
    for g in got:
        assert torch.equal(g.latents, ref.latents)
    said = [r.getMessage() for r in caplog.records if "fast mode: opaque" in r.getMessage()]
    assert len(said) == 1 and "6 of 14" in said[0] and "sdpa" in said[0], said


def test_fast_on_onnxruntime_matches_sdpa(tiny_engine, monkeypatch, tmp_path_factory):
    """fast's image on onnxruntime (the exported UNet for the plain passes, its text encoder and VAE)
    equals sdpa's within the exported graph's own rounding, as paper-exact's does
    (tests/test_engine_vs_reference.py: 2e-5 of the latent scale). The graphs are the session's one
    CLI export of the tiny model (tests/export_support.py), shared with the export tests."""
    import_or_skip("onnxruntime", "the onnxruntime backend needs the export extra")
    import_or_skip("onnxscript", "the onnxruntime backend needs the export extra")
    from export_support import exported_onnx_dir

    # the embedded default is the tiny model here (conftest), with tiny_engine's weights; the export names it
    engine = cones2.Engine.from_pretrained(None, backend="onnxruntime",
                                           backend_options={"onnx_dir": str(exported_onnx_dir(tmp_path_factory))})
    spy = OpaqueRunner(engine.runner("onnxruntime"))
    spy.encode_ids, spy.decode = spy.inner.encode_ids, spy.inner.decode
    monkeypatch.setitem(engine._runners, "onnxruntime", spy)
    layout = cones2.Layout.from_boxes(LAYOUT)
    kw = dict(mode="fast", height=64, width=64, seed=5, progress=False, **EVERY_PASS_KIND)
    ref = tiny_engine.generate(PROMPT, None, layout, backend="sdpa", **kw)
    got = engine.generate(PROMPT, None, layout, **kw)
    assert got.backend == "onnxruntime" and spy.calls == 8
    scale = ref.latents.abs().max().item()
    err = (got.latents - ref.latents).abs().max().item()
    print(f"fast onnxruntime vs sdpa: max abs latent difference {err:.3g}, scale {scale:.3g}")
    assert err <= 2e-5 * max(scale, 1.0)


def test_a_unet_the_shallow_pass_cannot_mirror_runs_every_pass_full(tiny_engine, monkeypatch):
    """The shallow pass re-implements the plain SD forward, so a UNet with class / addition embeddings
    or centred inputs must not get one: fast then equals fast with cache_interval=1."""
    from types import SimpleNamespace

    import cones2.engine
    from cones2.reuse import shallow_supported

    plain = dict(class_embed_type=None, addition_embed_type=None, center_input_sample=False)
    assert shallow_supported(tiny_engine.unet)
    assert not shallow_supported(SimpleNamespace(config=SimpleNamespace(**plain | {"center_input_sample": True}),
                                                 up_blocks=[0, 1]))
    layout = cones2.Layout.from_boxes(LAYOUT)
    kw = dict(mode="fast", height=64, width=64, seed=5, progress=False)
    reused = tiny_engine.generate(PROMPT, None, layout, **kw).latents
    full = tiny_engine.generate(PROMPT, None, layout, cache_interval=1, **kw).latents
    monkeypatch.setattr(cones2.engine, "shallow_supported", lambda unet: False)
    assert torch.equal(tiny_engine.generate(PROMPT, None, layout, **kw).latents, full)
    assert not torch.equal(reused, full)
