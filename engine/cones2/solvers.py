"""The update rules of the sampler: SPEC 4's Euler step and DPM-Solver++ 2M for `fast` mode.

Both work on the Karras / k-diffusion parameterisation the sampler uses everywhere: `x` at noise
level sigma is `x0 + sigma * noise` (the UNet sees `x / sqrt(sigma^2 + 1)`), `x0` is the model's
data prediction at that step. A solver is a pure function of (step index, x, x0 of this step,
x0 of the previous step): the sampler owns the history, so self-recurrence can take a step twice
without a hidden counter advancing (the SPEC 4 caveat on diffusers' schedulers).
Coefficients are computed once on the host from the schedule's sigmas.
"""
from __future__ import annotations

import math

import torch

from .modes import DPMPP_2M, EULER


class EulerSolver:
    """SPEC 4: x_{i+1} = x + (sigma_{i+1} - sigma_i) * (x - x0) / sigma_i. No history."""

    def __init__(self, sigmas: tuple[float, ...]):
        self.sigmas = sigmas

    def update(self, i: int, x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None) -> torch.Tensor:
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        return x + (s_next - s) * (x - x0) / s


class DPMSolverPP2M:
    """DPM-Solver++ 2M (Lu et al. 2022, multistep, second order, data prediction, midpoint form).

    With lambda = -log(sigma) and h_i = lambda_{i+1} - lambda_i, one step is

        x_{i+1} = (sigma_{i+1} / sigma_i) * x + (1 - sigma_{i+1} / sigma_i) * D
        D       = x0_i + (x0_i - x0_{i-1}) / (2 r_i),   r_i = h_{i-1} / h_i

    and D = x0_i (first order, = the Euler step) at the first step, where there is no history, and
    at the last step when it goes to sigma = 0 (h is infinite there; x_N = x0_{N-1}). This is
    diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero") written in the sampler's variables; its
    x is ours times 1/sqrt(sigma^2 + 1), which cancels out of the update.
    """

    def __init__(self, sigmas: tuple[float, ...]):
        self.sigmas = sigmas
        n = len(sigmas) - 1
        self.ratio = [sigmas[i + 1] / sigmas[i] for i in range(n)]
        # 1 / (2 r_i) for steps that can be second order, None where the step is first order
        self.half_over_r: list[float | None] = [None] * n
        for i in range(1, n):
            if sigmas[i + 1] > 0:
                h = math.log(sigmas[i] / sigmas[i + 1])
                h_last = math.log(sigmas[i - 1] / sigmas[i])
                self.half_over_r[i] = h / (2.0 * h_last)

    def update(self, i: int, x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None) -> torch.Tensor:
        a, k = self.ratio[i], self.half_over_r[i]
        d = x0 if k is None or prev_x0 is None else x0 + k * (x0 - prev_x0)
        return a * x + (1.0 - a) * d


def make_solver(schedule) -> EulerSolver | DPMSolverPP2M:
    """The update rule named by `schedule.solver`, with the schedule's sigmas."""
    kinds = {EULER: EulerSolver, DPMPP_2M: DPMSolverPP2M}
    return kinds[schedule.solver](schedule.sigmas)
