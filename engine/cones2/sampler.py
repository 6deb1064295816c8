"""The layout-guided sampler with self-recurrence (SPEC section 4): Euler in `paper-exact` mode,
DPM-Solver++ 2M in `fast` mode (the update rules are `solvers`).

One loop for a batch of R requests that share resolution, step count, guidance steps and mode. Both
CFG branches run as one UNet call of batch 2R: [cond_1..cond_R, uncond_1..uncond_R]. Everything that
does not change per step (embeddings, weight maps, coefficients, timesteps) is prepared before the
loop, which holds no host syncs.

Self-recurrence with a multistep solver: a guided step i is taken, re-noised back to sigma_i and
taken again; both passes use the same history (x0 of step i-1), and only the second pass's x0
becomes the history of step i+1. The first pass only produces the point that gets re-noised, exactly
as in SPEC 4's Euler form (where there is no history, this is SPEC 4 itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .attention import Rectification
from .errors import GenerationCancelled
from .reuse import ReusingRunner, StepPlan
from .runners import TorchUNetRunner
from .schedule import Schedule
from .solvers import make_solver


class NoiseStream:
    """Gaussian noise for one request in SPEC 4's order: the initial latents, then one draw per
    self-recurrence. `paper-exact` draws from a CPU generator seeded like `torch.manual_seed(seed)`;
    `fast` draws from a generator on the device.

    `draw(count)` takes all of a loop's draws before it starts, one `randn` call per draw in the
    same order as drawing them step by step (same values), and moves them to the device in one
    copy, so no sampling step waits on the host."""

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device, exact_cpu: bool):
        gen_device = torch.device("cpu") if exact_cpu else torch.device(device)
        self.generator = torch.Generator(device=gen_device).manual_seed(seed)
        self.shape, self.gen_device, self.device = shape, gen_device, torch.device(device)

    def next(self) -> torch.Tensor:
        return self.draw(1)[0]

    def draw(self, count: int) -> torch.Tensor:
        """The next `count` draws, stacked: (count, *shape) float32 on the device."""
        draws = [torch.randn(self.shape, generator=self.generator, device=self.gen_device, dtype=torch.float32)
                 for _ in range(count)]
        return torch.stack(draws).to(self.device)


@dataclass
class BatchInputs:
    """Per-request tensors stacked over the batch (R requests).

    cond/uncond: (R, 77, D) in the model dtype. weights: query count N -> (R, N, 77) float32, or
    None when no request has a layout. guidance_weight, cfg_scale: (R,) float32.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    weights: dict[int, torch.Tensor] | None
    guidance_weight: torch.Tensor
    cfg_scale: torch.Tensor
    noise: list[NoiseStream]


def sample(runner, inputs: BatchInputs, schedule: Schedule, guidance_log_terms: list[float],
           prediction_type: str, *, plan: StepPlan | None = None, eager: TorchUNetRunner | None = None,
           progress: bool = True,
           on_step: Callable[[int, int, torch.Tensor], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Run the sampler and return the final latents (R, C, h, w) float32 (before VAE decoding).

    schedule: timesteps, sigmas (N + 1, the last 0) and the solver that steps along them.
    guidance_log_terms: log(1 + sigma_i^2) of SPEC 3 for the G guided steps (len = G).
    plan: `fast` mode's work reuse (`cones2.reuse.StepPlan`); None or a plan that reuses nothing:
    every step is a full CFG call on `runner` (paper-exact always is). The plan's plain passes run on
    `runner`, the ones that reuse work on the eager PyTorch UNet: `runner` itself when it is a
    `TorchUNetRunner`, else `eager` (the engine hands in one with the same attention math, so a
    compiled or exported runner gives the same image). Without either, every step runs in full.
    """
    R = inputs.cond.shape[0]
    device, dtype = inputs.cond.device, inputs.cond.dtype
    steps, G = len(schedule.timesteps), len(guidance_log_terms)
    sigmas = schedule.sigmas

    # ---- prepared once ----------------------------------------------------------------------
    embeddings = torch.cat([inputs.cond, inputs.uncond])
    timesteps = torch.tensor(schedule.timesteps, dtype=torch.float32, device=device)
    cfg = inputs.cfg_scale.to(device)[:, None, None, None]
    rectifications: list[Rectification | None] = [None] * G
    if inputs.weights is not None and G:
        weights = {n: torch.cat([w, torch.zeros_like(w)]) for n, w in inputs.weights.items()}
        logs = torch.tensor(guidance_log_terms, dtype=torch.float32, device=device)            # (G,)
        coefs = torch.cat([inputs.guidance_weight.to(device)[None] * logs[:, None],
                           torch.zeros(G, R, device=device)], dim=1)                       # (G, 2R)
        rectifications = [Rectification(weights, coefs[i]) for i in range(G)]
    # every draw of the loop, taken now: noise[0] the start, noise[1 + i] the re-noise of guided step i
    noise = torch.cat([n.draw(1 + G) for n in inputs.noise], dim=1)                       # (1 + G, R, ...)
    x = noise[0] * sigmas[0]

    solver = make_solver(schedule)
    # work reuse runs on the eager PyTorch UNet; a compiled or exported runner takes the plain passes
    eager = runner if isinstance(runner, TorchUNetRunner) else eager
    if plan is not None and not (plan.reuses and eager is not None):
        plan = None
    reuse = ReusingRunner(eager, R) if plan is not None else None

    def denoise(i: int, x: torch.Tensor) -> torch.Tensor:
        """x0 predicted at step i from x (both CFG branches in one UNet call, or, in a reusing
        plan's tail, the conditional branch alone)."""
        s = sigmas[i]
        xin = (x / math.sqrt(s * s + 1)).to(dtype)
        rect = rectifications[i] if i < G else None
        if reuse is None or plan.plain(i):
            pred = runner(torch.cat([xin, xin]), timesteps[i], embeddings, rect).float()
        elif plan.cfg(i):
            pred = reuse(torch.cat([xin, xin]), timesteps[i], embeddings, rect, cfg=True, depth=plan.depth(i),
                         record_cross=plan.records_cross_attention(i),
                         record_deep=plan.records_deep_features(i)).float()
        else:
            pred = reuse(xin, timesteps[i], inputs.cond, None, cfg=False, depth=plan.depth(i), record_cross=False,
                         record_deep=plan.records_deep_features(i)).float()
        if pred.shape[0] == 2 * R:
            e_cond, e_uncond = pred[:R], pred[R:]
            e = e_uncond + cfg * (e_cond - e_uncond)
        else:
            e = pred
        if prediction_type == "v_prediction":
            return e * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
        return x - s * e

    prev_x0 = None
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"stopped before step {i} of {steps}")
        x0 = denoise(i, x)
        x_next = solver.update(i, x, x0, prev_x0)
        if i < G:  # self-recurrence: re-noise to sigma_i and take step i again, with the same history
            renoise = math.sqrt(max(sigmas[i] ** 2 - sigmas[i + 1] ** 2, 0.0))
            x = x_next + renoise * noise[1 + i]
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"stopped during step {i} of {steps}")
            x0 = denoise(i, x)
            x_next = solver.update(i, x, x0, prev_x0)
        x, prev_x0 = x_next, x0
        if on_step is not None:
            on_step(i, steps, x)
    return x
