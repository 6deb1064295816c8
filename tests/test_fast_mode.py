"""`fast` mode: DPM-Solver++ 2M on the training sigmas (engine/cones2/solvers.py), its defaults, and how
self-recurrence shares the multistep history.

The solver is checked against diffusers' own DPMSolverMultistepScheduler run as a plain loop over an
independently loaded UNet (with guidance_steps=0 there is no self-recurrence, so diffusers'
internal step counter is harmless), and the self-recurrence bookkeeping against a hand-written
loop in lambda = -log(sigma) form.
"""
from __future__ import annotations

import math

import pytest
import torch

import cones2
from cones2.attention import Rectification
from cones2.config import SamplingConfig
from cones2.modes import MODES
from cones2.sampler import BatchInputs, sample
from cones2.schedule import guidance_log_terms, make_schedule

PROMPT = "a dog and a mug on the beach"
LAYOUT = {"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}


# ---- defaults -------------------------------------------------------------------------------------
def test_mode_defaults():
    assert SamplingConfig().steps == 50 and SamplingConfig().guidance_steps == 50
    fast = SamplingConfig(mode="fast")
    assert (fast.steps, fast.guidance_steps, fast.gate_step, fast.cache_interval) == (11, 3, 10, 2)
    assert SamplingConfig(mode="fast", steps=25).guidance_steps == 7     # integer ceil of 27% of 25 = 6.75
    assert SamplingConfig(mode="fast", steps=20).guidance_steps == 6
    assert SamplingConfig(mode="fast", steps=20).gate_step == 18          # the last 10%: conditional-only
    assert SamplingConfig(mode="fast", steps=20, gate_step=10).gate_step == 10
    assert SamplingConfig(mode="fast", steps=1).guidance_steps == 1
    assert SamplingConfig(mode="paper-exact").gate_step == 50 and SamplingConfig().cache_interval == 1
    assert SamplingConfig(mode="fast", guidance_steps=0).guidance_steps == 0      # caller overrides
    assert SamplingConfig(mode="fast", steps=20, guidance_steps=99).guidance_steps == 20
    assert SamplingConfig(mode="paper-exact", steps=30).guidance_steps == 30
    assert MODES["fast"].cpu_noise is False and MODES["paper-exact"].cpu_noise is True


def test_fast_schedule_is_diffusers_linspace():
    from diffusers import DPMSolverMultistepScheduler

    for steps in (1, 8, 20, 25):
        ours = make_schedule("fast", steps)
        theirs = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing="linspace", final_sigmas_type="zero")
        theirs.set_timesteps(steps)
        assert list(ours.timesteps) == [float(t) for t in theirs.timesteps]
        torch.testing.assert_close(torch.tensor(ours.sigmas), theirs.sigmas, rtol=0, atol=0)


# ---- against diffusers ----------------------------------------------------------------------------
def _diffusers_dpmpp_2m(model_dir, engine, cond, uncond, noise, steps, cfg):
    """A plain DPMSolverMultistepScheduler loop, configured to be the same algorithm as `fast`:

    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint": DPM-Solver++ 2M, data
      prediction, the midpoint form (D = x0 + (x0 - x0_prev) / 2r).
    timestep_spacing="linspace", use_karras_sigmas=False: round(linspace(0, T-1, N+1))[::-1][:-1],
      sigmas read off the training schedule at those integer timesteps (our DPMSolverSchedule).
    final_sigmas_type="zero", lower_order_final=True, euler_at_final=False: the last step goes to
      sigma = 0 and is first order (x_N = x0), as ours. thresholding=False, lambda_min_clipped=-inf.
    The start point: diffusers keeps x in the variance-preserving scale x_vp = x / sqrt(sigma^2 + 1)
      (so scale_model_input is the identity and the UNet sees exactly our xin) and its pipelines
      start from `noise` (init_noise_sigma = 1). SPEC 4 starts at x = sigma_0 * noise, i.e.
      x_vp = noise * sigma_0 / sqrt(sigma_0^2 + 1); we hand diffusers that same point. At sigma = 0
      both scales coincide, so the final latents compare directly.
    """
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    sc = engine.components.scheduler_config
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=sc["num_train_timesteps"], beta_start=sc["beta_start"], beta_end=sc["beta_end"],
        beta_schedule=sc["beta_schedule"], prediction_type=sc["prediction_type"], algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, euler_at_final=False,
        final_sigmas_type="zero", timestep_spacing="linspace", use_karras_sigmas=False, thresholding=False)
    sched.set_timesteps(steps)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()   # its own module, stock attention
    s0 = sched.sigmas[0].item()
    x = noise * (s0 / math.sqrt(s0 * s0 + 1))
    embeddings = torch.cat([cond, uncond])
    with torch.no_grad():
        for t in sched.timesteps:
            pred = unet(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample
            guided = pred[1:] + cfg * (pred[:1] - pred[1:])
            x = sched.step(guided, t, x).prev_sample
    return x


@pytest.mark.parametrize("which", ["v", "eps"])
def test_unguided_fast_equals_diffusers_dpmsolver_multistep(which, tiny_model_dir, tiny_eps_model_dir, tiny_engine,
                                                             tiny_eps_engine):
    model_dir, engine = (tiny_model_dir, tiny_engine) if which == "v" else (tiny_eps_model_dir, tiny_eps_engine)
    steps, seed, height, width, cfg = 12, 3, 64, 128, 7.5
    result = engine.generate(PROMPT, seed=seed, steps=steps, guidance_steps=0, mode="fast", height=height,
                             width=width, cfg_scale=cfg, gate_step=steps, cache_interval=1, progress=False)
    # fast mode's noise: a per-request generator on the device (the CPU here), seeded with `seed`
    noise = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    uncond = engine.encode([""]).float()
    theirs = _diffusers_dpmpp_2m(model_dir, engine, result.cond_embeddings, uncond, noise, steps, cfg)
    scale = theirs.abs().max().item()
    err = (result.latents - theirs).abs().max().item()
    print(f"{which}: max abs error {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-5 * max(scale, 1.0)


# ---- self-recurrence with a multistep history -----------------------------------------------------
class _ToyUNet:
    """A deterministic, input-dependent stand-in for the UNet: enough to tell histories apart."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, embeddings, rectification):
        self.calls.append((float(timestep), rectification is not None))
        bias = embeddings.mean(dim=(1, 2))[:, None, None, None]
        bump = 0.0 if rectification is None else 0.1 * rectification.coef[:, None, None, None]
        return torch.tanh(sample * (1.0 + timestep / 1000.0)) * 0.7 + bias + bump


class _Noise:
    def __init__(self, seed, shape):
        self.gen, self.shape = torch.Generator().manual_seed(seed), shape

    def next(self):
        return torch.randn(self.shape, generator=self.gen)

    def draw(self, count):
        return torch.stack([self.next() for _ in range(count)])


def _hand_written(unet, schedule, G, coefs, cond, uncond, noise, cfg, prediction_type):
    """DPM-Solver++ 2M in lambda = -log(sigma) form, with SPEC 4's self-recurrence: a guided step is
    taken, re-noised by sqrt(sigma_i^2 - sigma_{i+1}^2) and taken again from the same history (the
    x0 of step i-1); the second pass's x0 is what step i+1 sees as its history."""
    sig, ts = schedule.sigmas, schedule.timesteps

    def x0_at(i, x):
        s = sig[i]
        xin = x / math.sqrt(s * s + 1)
        rect = Rectification({}, coefs[i]) if i < G else None
        out = unet(torch.cat([xin, xin]), torch.tensor(ts[i]), torch.cat([cond, uncond]), rect)
        e = out[1:] + cfg * (out[:1] - out[1:])
        if prediction_type == "v_prediction":
            return e * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
        return x - s * e

    def step(i, x, d, old):
        if sig[i + 1] == 0:
            return d
        h = math.log(sig[i]) - math.log(sig[i + 1])
        if old is not None:
            r = (math.log(sig[i - 1]) - math.log(sig[i])) / h
            d = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        return math.exp(-h) * x - math.expm1(-h) * d

    x = noise.next() * sig[0]
    old = None
    for i in range(len(ts)):
        d = x0_at(i, x)
        x_next = step(i, x, d, old)
        if i < G:
            x = x_next + math.sqrt(sig[i] ** 2 - sig[i + 1] ** 2) * noise.next()
            d = x0_at(i, x)
            x_next = step(i, x, d, old)
        x, old = x_next, d
    return x


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("steps,G", [(6, 3), (5, 5), (4, 0), (1, 1)])
def test_self_recurrence_reuses_the_previous_x0(prediction_type, steps, G):
    schedule = make_schedule("fast", steps)
    shape = (1, 4, 3, 5)
    cond, uncond = torch.full((1, 2, 3), 0.2), torch.full((1, 2, 3), -0.1)
    log_terms = guidance_log_terms(G)
    inputs = BatchInputs(cond=cond, uncond=uncond, weights={15: torch.zeros(1, 15, 3)},
                         guidance_weight=torch.tensor([0.08]), cfg_scale=torch.tensor([7.5]), noise=[_Noise(5, shape)])
    toy = _ToyUNet()
    ours = sample(toy, inputs, schedule, log_terms, prediction_type, progress=False)
    assert len(toy.calls) == steps + G and [g for _, g in toy.calls].count(True) == 2 * G
    coefs = [torch.tensor([0.08 * t, 0.0]) for t in log_terms]
    theirs = _hand_written(_ToyUNet(), schedule, G, coefs, cond, uncond, _Noise(5, shape), 7.5, prediction_type)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- the engine in fast mode ------------------------------------------------------------------------
def test_guided_fast_is_deterministic_and_guided(tiny_engine):
    layout = cones2.Layout.from_boxes(LAYOUT)
    residual = {"dog": cones2.Residual(0.3 * torch.ones(1, tiny_engine.text_dim))}
    kw = dict(mode="fast", steps=5, height=64, width=64, progress=False)
    a = tiny_engine.generate(PROMPT, residual, layout, seed=11, **kw)
    b = tiny_engine.generate(PROMPT, residual, layout, seed=11, **kw)
    assert a.request.config.guidance_steps == 2                             # ceil(27% of 5)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    unguided = tiny_engine.generate(PROMPT, residual, layout, seed=11, guidance_steps=0, **kw)
    assert (a.latents - unguided.latents).abs().max() > 1e-3
    other_seed = tiny_engine.generate(PROMPT, residual, layout, seed=12, **kw)
    assert (a.latents - other_seed.latents).abs().max() > 1e-3


def test_fast_defaults_through_the_api(tiny_engine, monkeypatch):
    calls = []
    runner = tiny_engine.runner()
    monkeypatch.setattr(type(runner), "__call__", lambda self, *a: calls.append(a[3] is not None) or
                        torch.zeros_like(a[0]))
    layout = cones2.Layout.from_boxes(LAYOUT)
    result = tiny_engine.generate(PROMPT, None, layout, mode="fast", gate_step=11, cache_interval=1, height=64,
                                  width=64, progress=False)
    assert (result.request.config.steps, result.request.config.guidance_steps) == (11, 3)
    assert len(calls) == 11 + 3 and calls.count(True) == 6                  # without reuse: 14 CFG-pair calls
    calls.clear()                                                           # (with it: tests/test_flops_calls.py)
    tiny_engine.generate(PROMPT, None, layout, height=64, width=64, progress=False)
    assert len(calls) == 100                                                # paper-exact: 50 steps, all guided


def test_one_step_fast_equals_paper_exact_on_cpu(tiny_engine):
    """With N = 1 both schedules are {sigma(999), 0} and both solvers return x0; on the CPU both
    modes draw noise from a CPU generator seeded alike, so the results agree to rounding."""
    layout = cones2.Layout.from_boxes(LAYOUT)
    kw = dict(seed=4, steps=1, guidance_steps=1, height=64, width=64, progress=False)
    a = tiny_engine.generate(PROMPT, None, layout, mode="paper-exact", **kw).latents
    b = tiny_engine.generate(PROMPT, None, layout, mode="fast", **kw).latents
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cli_fast_mode_uses_the_fast_defaults(tiny_model_dir, tmp_path):
    import json

    from PIL import Image

    from cones2.cli import main

    out = tmp_path / "fast.png"
    threads = torch.get_num_threads()
    try:
        code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog and a mug", "--box",
                     "dog=0,0,0.5,1", "--mode", "fast", "--resolution", "64", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    params = json.loads(Image.open(out).text["cones2"])
    assert (params["mode"], params["steps"], params["guidance_steps"]) == ("fast", 11, 3)


# ---- issue 24 item 6: every draw taken before the loop, the same values as drawing per step ----------
def _old_sample(runner, inputs, schedule, log_terms, prediction_type, seeds, shape):
    """The sampler as it was before issue 24 (engine/cones2/sampler.py at 5fc0783), with its per-step
    draws: torch.randn on a CPU generator, then a copy to the device, once per guided step."""
    from cones2.solvers import make_solver

    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32).to(inputs.cond.device) for g in gens])

    R, dtype = inputs.cond.shape[0], inputs.cond.dtype
    steps, G, sigmas = len(schedule.timesteps), len(log_terms), schedule.sigmas
    embeddings = torch.cat([inputs.cond, inputs.uncond])
    timesteps = torch.tensor(schedule.timesteps, dtype=torch.float32)
    cfg = inputs.cfg_scale[:, None, None, None]
    weights = {n: torch.cat([w, torch.zeros_like(w)]) for n, w in inputs.weights.items()}
    logs = torch.tensor(log_terms, dtype=torch.float32)
    coefs = torch.cat([inputs.guidance_weight[None] * logs[:, None], torch.zeros(G, R)], dim=1)
    rects = [Rectification(weights, coefs[i]) for i in range(G)]
    x = draw() * sigmas[0]
    solver = make_solver(schedule)

    def denoise(i, x):
        s = sigmas[i]
        xin = (x / math.sqrt(s * s + 1)).to(dtype)
        pred = runner(torch.cat([xin, xin]), timesteps[i], embeddings, rects[i] if i < G else None).float()
        e = pred[R:] + cfg * (pred[:R] - pred[R:])
        if prediction_type == "v_prediction":
            return e * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
        return x - s * e

    prev = None
    for i in range(steps):
        x0 = denoise(i, x)
        x_next = solver.update(i, x, x0, prev)
        if i < G:
            x = x_next + math.sqrt(max(sigmas[i] ** 2 - sigmas[i + 1] ** 2, 0.0)) * draw()
            x0 = denoise(i, x)
            x_next = solver.update(i, x, x0, prev)
        x, prev = x_next, x0
    return x


@pytest.mark.parametrize("mode,steps,G", [("paper-exact", 5, 3), ("paper-exact", 3, 3), ("fast", 5, 3)])
def test_predrawn_noise_gives_bit_identical_latents(tiny_engine, mode, steps, G):
    """Two requests in one loop (two noise streams), guided and unguided steps: the engine's latents
    equal the old per-step-draw loop's bit for bit (torch.equal, no tolerance)."""
    layout = cones2.Layout.from_boxes(LAYOUT)
    no_reuse = dict(gate_step=steps, cache_interval=1) if mode == "fast" else {}   # the old loop had none
    reqs = [tiny_engine.request(PROMPT, None, layout, height=64, width=64, seed=seed, steps=steps,
                                guidance_steps=G, mode=mode, **no_reuse) for seed in (5, 9)]
    ours = torch.cat([g.latents for g in tiny_engine.generate_batch(reqs, progress=False)])
    runner = tiny_engine.runner()
    inputs = tiny_engine._batch_inputs(reqs, [tiny_engine._prepare(r, runner) for r in reqs])
    sc = tiny_engine.components.scheduler_config
    schedule = make_schedule(mode, steps, sc["beta_start"], sc["beta_end"], sc["beta_schedule"],
                             sc["num_train_timesteps"])
    theirs = _old_sample(runner, inputs, schedule, guidance_log_terms(G), tiny_engine.prediction_type, (5, 9),
                         (1, 4, 8, 8))
    assert torch.equal(ours, theirs)
