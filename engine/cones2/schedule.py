"""Noise schedules: SPEC 4's Euler schedule, the `fast` mode's DPM-Solver++ schedule, and the
guidance sigmas of SPEC 3.

Both sampling schedules live on the model's training sigmas. Everything here is computed once per
request on the host, before the sampling loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Cones2Error
from .modes import DPMPP_2M, EULER, get_mode

# The guidance schedule always uses Stable Diffusion's training betas (SPEC 3), whatever the model.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def training_sigmas(beta_start: float, beta_end: float, beta_schedule: str, num_train_timesteps: int) -> np.ndarray:
    """sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (float32 values, as diffusers builds them)."""
    T = int(num_train_timesteps)
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    else:
        raise Cones2Error(f"unsupported beta_schedule {beta_schedule!r} (scaled_linear or linear)", "scheduler.beta_schedule")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


@dataclass(frozen=True)
class EulerSchedule:
    """SPEC 4: timesteps t_i = linspace(T-1, 0, N) and sigmas at t_i plus a final 0 (N + 1 values)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    solver = EULER

    @classmethod
    def make(cls, steps: int, beta_start: float, beta_end: float, beta_schedule: str,
             num_train_timesteps: int) -> "EulerSchedule":
        train = training_sigmas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        t = np.linspace(num_train_timesteps - 1, 0, steps, dtype=np.float64)
        s = np.interp(t, np.arange(num_train_timesteps), train).astype(np.float32)
        return cls(tuple(float(v) for v in t.astype(np.float32)), tuple(float(v) for v in s) + (0.0,))


@dataclass(frozen=True)
class DPMSolverSchedule:
    """`fast` mode: N integer timesteps round(linspace(0, T-1, N+1))[::-1][:-1] (T-1 down to about
    T/N, the model is never evaluated at t=0), their training sigmas, then a final 0 (N + 1 values).

    This is diffusers' DPMSolverMultistepScheduler with timestep_spacing="linspace" and
    final_sigmas_type="zero": N model evaluations at N distinct noise levels, the last one jumping
    to the clean sample. Integer timesteps sit exactly on the training sigmas.
    """

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    solver = DPMPP_2M

    @classmethod
    def make(cls, steps: int, beta_start: float, beta_end: float, beta_schedule: str,
             num_train_timesteps: int) -> "DPMSolverSchedule":
        train = training_sigmas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        t = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        return cls(tuple(float(v) for v in t), tuple(float(train[v]) for v in t) + (0.0,))


Schedule = EulerSchedule | DPMSolverSchedule


def make_schedule(mode: str, steps: int, beta_start: float = 0.00085, beta_end: float = 0.012,
                  beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000) -> Schedule:
    """The schedule of `mode`'s solver (`cones2.modes`) for `steps` steps on the model's training betas."""
    kind = EulerSchedule if get_mode(mode).solver == EULER else DPMSolverSchedule
    return kind.make(steps, beta_start, beta_end, beta_schedule, num_train_timesteps)


def guidance_log_terms(guidance_steps: int) -> list[float]:
    """log(1 + sigma_i^2) for i < G, sigma_i from an SD-betas schedule of G steps (SPEC 3).

    The rectification coefficient of a guided step is guidance_weight * this term. Every mode uses
    it as SPEC 3 defines it: it depends on G only, not on the sampler's own schedule.
    """
    if guidance_steps == 0:
        return []
    sigmas = EulerSchedule.make(guidance_steps, **SD_BETAS).sigmas
    return [math.log(1.0 + sigmas[i] ** 2) for i in range(guidance_steps)]
