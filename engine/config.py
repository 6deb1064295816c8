"""Sampling settings as one frozen, validated object (SPEC sections 3 and 4).

Validated once at the edge; the sampler and the attention backends trust it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import Cones2Error

MODES = ("paper-exact", "fast")
MAX_STEPS = 1000
MAX_SIDE = 4096


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise Cones2Error(f"must be a number, got {value!r}", name) from None
    if not math.isfinite(value):
        raise Cones2Error(f"must be finite, got {value}", name)
    return value


def _int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise Cones2Error(f"must be an integer, got {value!r}", name)
    if not lo <= value <= hi:
        raise Cones2Error(f"must be in [{lo}, {hi}], got {value}", name)
    return value


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one image.

    steps: Euler steps N. guidance_steps: G, steps that use layout guidance and self-recurrence
    (None = all steps; values above `steps` are clamped to `steps`, as the reference does).
    guidance_weight: g in SPEC 3. cfg_scale: classifier-free guidance scale.
    negative_weight: w- outside each subject's region. height/width: output pixels, multiples of 64.
    mode: "paper-exact" (CPU noise stream of SPEC 4) or "fast" (noise drawn on the device).
    """

    height: int = 768
    width: int = 768
    steps: int = 50
    guidance_steps: int | None = None
    guidance_weight: float = 0.08
    cfg_scale: float = 7.5
    negative_weight: float = -1e8
    seed: int = 0
    mode: str = "paper-exact"

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("steps", _int("steps", self.steps, 1, MAX_STEPS))
        g = self.steps if self.guidance_steps is None else _int("guidance_steps", self.guidance_steps, 0, 10**6)
        put("guidance_steps", min(g, self.steps))
        for side in ("height", "width"):
            v = _int(side, getattr(self, side), 64, MAX_SIDE)
            if v % 64:
                raise Cones2Error(f"must be a multiple of 64, got {v}", side)
            put(side, v)
        put("guidance_weight", _finite("guidance_weight", self.guidance_weight))
        if self.guidance_weight < 0:
            raise Cones2Error(f"must be >= 0, got {self.guidance_weight}", "guidance_weight")
        put("cfg_scale", _finite("cfg_scale", self.cfg_scale))
        put("negative_weight", _finite("negative_weight", self.negative_weight))
        if self.negative_weight > 0:
            raise Cones2Error(f"must be <= 0, got {self.negative_weight}", "negative_weight")
        put("seed", _int("seed", self.seed, 0, 2**63 - 1))
        if self.mode not in MODES:
            raise Cones2Error(f"must be one of {', '.join(MODES)}, got {self.mode!r}", "mode")
