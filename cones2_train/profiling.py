"""Where a training step's time goes: per-phase wall clock, enabled only when profiling.

Disabled (the default), a phase is a no-op context; enabled, it synchronises CUDA at each phase
edge, which costs a little speed, so steps/s is measured with profiling off by `bench/train_speed.py`.
"""
from __future__ import annotations

import contextlib
import time

import torch

STEP_PHASES = ("data", "text_encoder_forward", "unet_forward", "unet_backward", "text_encoder_backward",
               "optimizer")


class PhaseTimer:
    """`with timer("unet_forward"):` adds the block's wall seconds to `timer.seconds[name]`."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def format_profile(seconds: dict[str, float], steps: int) -> str:
    """A table: each step phase's ms per step and share of the step; the one-off costs (VAE cache,
    residual extraction) apart, in total ms."""
    step_total = sum(seconds.get(p, 0.0) for p in STEP_PHASES)
    lines = [f"{'phase':<24}{'ms/step':>10}{'share':>9}"]
    for phase in STEP_PHASES:
        s = seconds.get(phase, 0.0)
        lines.append(f"{phase:<24}{1e3 * s / max(steps, 1):>10.1f}{100 * s / max(step_total, 1e-12):>8.1f}%")
    lines.append(f"{'step total':<24}{1e3 * step_total / max(steps, 1):>10.1f}{100.0:>8.1f}%")
    for one_off in ("vae_cache", "residual_extraction"):
        if one_off in seconds:
            lines.append(f"{one_off} (one-off): {1e3 * seconds[one_off]:.1f} ms")
    return "\n".join(lines)
