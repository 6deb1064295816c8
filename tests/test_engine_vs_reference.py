"""The engine against the independent SPEC 2-4 implementation (tests/spec_reference.py), on tiny
SD-shaped models loaded separately with diffusers: `paper-exact` on every CPU backend (`reference`,
`sdpa`, `onnxruntime`, and `triton` under the interpreter), and guided `fast` (DPM-Solver++ 2M with
SPEC 3 guidance and self-recurrence) against the reference's own DPM-Solver++ loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cones2
import spec_reference as spec
from ci_support import import_or_skip


def _load_parts(model_dir):
    """The same checkpoint loaded independently of cones2 (its own module instances)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    import json

    parts = dict(
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval(),
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
    )
    sched = json.loads((model_dir / "scheduler/scheduler_config.json").read_text())
    betas = dict(beta_start=sched["beta_start"], beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"],
                 num_train_timesteps=sched["num_train_timesteps"])
    return parts, sched["prediction_type"], betas


def _box_mask(box, height, width):
    x0, y0, x1, y1 = box
    m = torch.zeros(height, width, dtype=torch.bool)
    m[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
    return m


CASES = {
    # two subjects, one multi-token ("teddybear" -> 2 tokens) with a (2, D) residual, partial guidance
    "v-two-subjects": dict(model="v", prompt="a dog and a teddybear on the beach", height=128, width=128,
                           residual_rows={"dog": 1, "teddybear": 2}, positions=None,
                           boxes={"dog": (0.05, 0.3, 0.5, 0.95), "teddybear": (0.55, 0.1, 0.95, 0.7)},
                           strengths={"dog": 2.5, "teddybear": 3.0}, steps=4, guidance_steps=3, seed=3,
                           residual_seed=101),
    # SD 1.x-like epsilon model, non-square, a repeated word, explicit positions for the residual
    "eps-nonsquare-explicit": dict(model="eps", prompt="a cat next to a cat and a mug", height=128, width=192,
                                   residual_rows={"cat": 1}, positions={"cat": [5]},
                                   boxes={"cat": (0.0, 0.0, 0.5, 1.0), "mug": (0.6, 0.4, 1.0, 1.0)},
                                   strengths={"cat": 2.5, "mug": 2.5}, steps=3, guidance_steps=3, seed=11,
                                   residual_seed=102),
    # no layout: self-recurrence still happens for i < G, with plain attention
    "v-no-layout": dict(model="v", prompt="a photo of a dog", height=64, width=128, residual_rows={"dog": 1},
                        positions=None, boxes={}, strengths={}, steps=3, guidance_steps=2, seed=5,
                        residual_seed=103),
    # the smallest guided case: the Triton kernel runs under its interpreter, slow at larger sizes
    "v-small": dict(model="v", prompt="a dog and a teddybear", height=64, width=64,
                    residual_rows={"dog": 1, "teddybear": 2}, positions=None,
                    boxes={"dog": (0.05, 0.3, 0.5, 0.95), "teddybear": (0.55, 0.1, 0.95, 0.7)},
                    strengths={"dog": 2.5, "teddybear": 3.0}, steps=2, guidance_steps=2, seed=4,
                    residual_seed=106, backends=("triton",)),
    # `fast` (DPM-Solver++ 2M): second-order steps inside and after the guided part, both model types,
    # the last step to sigma = 0; checked against spec_reference's loop written from the paper
    "v-fast-guided": dict(model="v", prompt="a dog and a teddybear on the beach", height=64, width=64,
                          residual_rows={"dog": 1, "teddybear": 2}, positions=None,
                          boxes={"dog": (0.05, 0.3, 0.5, 0.95), "teddybear": (0.55, 0.1, 0.95, 0.7)},
                          strengths={"dog": 2.5, "teddybear": 3.0}, steps=5, guidance_steps=3, seed=21,
                          residual_seed=104, mode="fast"),
    "eps-fast-guided": dict(model="eps", prompt="a cat next to a mug", height=64, width=128,
                            residual_rows={"cat": 1}, positions=None,
                            boxes={"cat": (0.0, 0.0, 0.5, 1.0), "mug": (0.6, 0.4, 1.0, 1.0)},
                            strengths={"cat": 2.5, "mug": 2.0}, steps=4, guidance_steps=2, seed=22,
                            residual_seed=105, mode="fast"),
}
SOLVER = {"paper-exact": "euler", "fast": "dpmpp-2m"}
# `fast`'s work reuse off (no conditional-only tail, a full pass every step): the reference computes every
# UNet call; the reuse's own deviation is bounded by tests/test_work_reuse.py.
NO_REUSE = {"fast": {"gate_step": 10**6, "cache_interval": 1}}
# paper-exact on every backend the CPU runs (triton on its own small case); `fast` differs from
# paper-exact only in the sampler, so two attention backends suffice there (the literal one and sdpa)
BACKENDS = {"paper-exact": ("reference", "sdpa", "onnxruntime"), "fast": ("reference", "sdpa")}
# The onnxruntime rows run the export cached on first use (~45 s idle per model, opt-in since issue 29):
# they run in `make test-integration`, where the v model's rows share the export that
# tests/test_cpu_default.py makes in the session cache. `make test` checks the exported UNet against
# the SPEC reference through the CLI's export (tests/test_export_onnx.py).
INTEGRATION = {(name, "onnxruntime") for name in CASES}
RUNS = [pytest.param(name, backend, marks=[pytest.mark.integration] if (name, backend) in INTEGRATION else [])
        for name, case in CASES.items() for backend in case.get("backends", BACKENDS[case.get("mode", "paper-exact")])]


class CountingRunner:
    """Stands in for the engine's runner of one backend: counts UNet calls, delegates everything else."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_eps_model_dir):
    return {"v": (tiny_model_dir, _load_parts(tiny_model_dir)), "eps": (tiny_eps_model_dir, _load_parts(tiny_eps_model_dir))}


@pytest.fixture(scope="module")
def reference_results(models):
    out = {}
    for name, case in CASES.items():
        model_dir, (parts, prediction, betas) = models[case["model"]]
        dim = parts["text_encoder"].config.hidden_size
        gen = torch.Generator().manual_seed(case["residual_seed"])   # fixed: a failure reproduces
        residuals = {w: 0.5 * torch.randn(k, dim, generator=gen) for w, k in case["residual_rows"].items()}
        regions = {w: (_box_mask(b, case["height"], case["width"]), case["strengths"][w]) for w, b in case["boxes"].items()}
        with torch.no_grad():
            ref = spec.reference_generate(
                **parts, prediction_type=prediction, prompt=case["prompt"], residuals=residuals,
                positions=case["positions"], regions=regions, seed=case["seed"], steps=case["steps"],
                guidance_steps=case["guidance_steps"], guidance_weight=0.08, cfg_scale=7.5, negative_weight=-1e8,
                height=case["height"], width=case["width"], solver=SOLVER[case.get("mode", "paper-exact")], **betas)
        out[name] = (residuals, ref)
    return out


@pytest.fixture(scope="module")
def engines(models):
    return {k: cones2.Engine.from_pretrained(d, backend="sdpa") for k, (d, _) in models.items()}


def _backend_class(backend: str) -> str:
    """The runner class each backend name must reach, named here (not asked of the engine)."""
    return "OrtUNetRunner" if backend == "onnxruntime" else "TorchUNetRunner"


@pytest.mark.parametrize("case_name,backend", RUNS)
def test_engine_matches_spec_reference(engines, reference_results, case_name, backend, monkeypatch):
    """`onnxruntime` (named without onnx_dir) runs the export the engine makes on first use and caches;
    `triton` runs the fused kernel under TRITON_INTERPRET=1 (conftest)."""
    if backend == "onnxruntime":
        import_or_skip("onnxruntime", "the onnxruntime backend needs the export extra")
        import_or_skip("onnxscript", "the onnxruntime backend needs the export extra")
    if backend == "triton":
        import_or_skip("triton", "the triton backend needs the [triton] extra")
    case = CASES[case_name]
    mode = case.get("mode", "paper-exact")
    residuals, ref = reference_results[case_name]
    engine = engines[case["model"]]
    # the backend that runs is the one asked for: its runner (and nothing else) takes every UNet call
    spy = CountingRunner(engine.runner(backend))
    monkeypatch.setitem(engine._runners, backend, spy)
    layout = cones2.Layout.from_boxes(case["boxes"], case["strengths"]) if case["boxes"] else None
    result = engine.generate(case["prompt"], {w: cones2.Residual(r) for w, r in residuals.items()}, layout,
                             subject_positions=case["positions"], seed=case["seed"], steps=case["steps"],
                             guidance_steps=case["guidance_steps"], height=case["height"], width=case["width"],
                             backend=backend, mode=mode, progress=False, **NO_REUSE.get(mode, {}))
    assert spy.calls == case["steps"] + case["guidance_steps"], f"{backend}: {spy.calls} UNet calls"
    assert type(spy.inner).__name__ == _backend_class(backend) and result.backend == backend
    if backend != "onnxruntime":
        assert spy.inner.name == backend
    # onnxruntime's text encoder is the exported graph in ORT's kernels: its own float rounding
    embedding_atol = 1e-5 if backend == "onnxruntime" else 1e-6
    torch.testing.assert_close(result.cond_embeddings, ref["cond_embeddings"], rtol=0, atol=embedding_atol)
    scale = ref["latents"].abs().max().item()
    err = (result.latents - ref["latents"]).abs().max().item()
    # fp32 throughout; `reference` is literal, `sdpa` uses the closed-form std and a fused softmax,
    # `onnxruntime` the exported graph's formulation (export/graph_attention.py) with ORT's kernels,
    # `triton` the fused kernel (online softmax, closed-form std). `fast` rows: any work-skipping knob
    # of `fast` mode must be off here (or its deviation bounded by its own test), as the reference
    # computes every UNet call.
    print(f"{case_name}/{backend}: max abs latent error {err:.3g}, scale {scale:.3g}")
    assert err <= 2e-5 * max(scale, 1.0), f"{backend}: max abs latent error {err:.3g} (latent scale {scale:.3g})"
    diff = (torch.tensor(ref["image"]).int() - torch.tensor(np.asarray(result.image)).int()).abs()
    assert diff.max().item() <= 1


def test_guidance_changes_the_result(engines):
    """Layout guidance is live: the same request with guidance_weight 0 gives different latents."""
    engine = engines["v"]
    layout = cones2.Layout.from_boxes({"dog": (0, 0, 0.5, 1)})
    kw = dict(seed=1, steps=3, height=64, width=64, progress=False)
    guided = engine.generate("a dog", layout=layout, **kw).latents
    unguided = engine.generate("a dog", layout=layout, guidance_weight=0.0, **kw).latents
    assert (guided - unguided).abs().max() > 1e-3


def test_batch_equals_single_requests(engines):
    """Cross-request batching keeps the std, noise and settings per sample."""
    engine = engines["v"]
    dim = engine.text_dim
    r1 = engine.request("a dog and a mug", {"dog": cones2.Residual(torch.randn(1, dim))},
                        cones2.Layout.from_boxes({"dog": (0, 0, 0.5, 1), "mug": (0.5, 0, 1, 1)}),
                        height=64, width=64, steps=3, seed=1)
    r2 = engine.request("a red mug", None, None, height=64, width=64, steps=3, seed=2, cfg_scale=5.0)
    r3 = engine.request("a cat", None, cones2.Layout.from_boxes({"cat": (0.2, 0.2, 0.8, 0.8)}, 1.5),
                        height=64, width=64, steps=3, seed=3, guidance_weight=0.05)
    batched = engine.generate_batch([r1, r2, r3], progress=False)
    for req, got in zip([r1, r2, r3], batched):
        alone = engine.generate_batch([req], progress=False)[0]
        # batched GEMMs round differently from single ones: equal up to float32 rounding
        torch.testing.assert_close(got.latents, alone.latents, rtol=1e-4, atol=1e-4)


def test_batch_rejects_incompatible_requests(engines):
    engine = engines["v"]
    a = engine.request("a dog", height=64, width=64, steps=3)
    b = engine.request("a dog", height=128, width=64, steps=3)
    with pytest.raises(cones2.Cones2Error, match="requests"):
        engine.generate_batch([a, b])


def test_cancellation_between_steps(engines):
    calls = []
    with pytest.raises(cones2.GenerationCancelled):
        engines["v"].generate("a dog", steps=4, height=64, width=64, progress=False,
                              should_stop=lambda: len(calls) >= 2, on_step=lambda i, n, x: calls.append(i))
    assert calls == [0, 1]


def test_paper_exact_is_the_default_mode(engines):
    """`fast` is another solver (DPM-Solver++ 2M, tests/test_fast_mode.py); the default stays SPEC 4."""
    kw = dict(seed=4, steps=2, height=64, width=64, progress=False)
    default = engines["v"].generate("a dog", **kw)
    exact = engines["v"].generate("a dog", mode="paper-exact", **kw)
    assert default.request.config.mode == "paper-exact"
    torch.testing.assert_close(default.latents, exact.latents, rtol=0, atol=0)
