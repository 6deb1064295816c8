"""Sampling settings as one frozen, validated object (docs/math.md sections 3 and 4).

The sampling defaults are written here once: `Engine.generate` and `Engine.request` take None for
"this default", and the CLI and the gRPC mapping leave unset fields unset. Validated once at the edge (CLI, gRPC and the Python API all build it); the sampler and the
attention backends trust it. The bounds live in `limits`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import limits
from .errors import Cones2Error, quote
from .limits import LAYOUT_RESIZES, MAX_SIDE, MAX_STEPS  # noqa: F401 (re-exported)
from .modes import DEFAULT_MODE, get_mode, mode_names

MODES = mode_names()   # re-exported: the table is `cones2.modes`


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one image. Every number is checked to be finite and in its range:

    steps: sampling steps N, in [1, 1000] (None = the mode's default: 50 paper-exact, 11 fast).
    guidance_steps: G, steps that use layout guidance and self-recurrence (None = the mode's default:
    all steps paper-exact, the first 27% fast; values above `steps` are clamped to `steps`, as the
    reference does). guidance_weight: g of SPEC 3, in [0, 10] (default 0.08). cfg_scale: classifier-free
    guidance scale, in [0, 100] (default 7.5). negative_weight: w- outside each subject's region,
    in [-1e9, 0] (default -1e8; any value <= -1e4 acts as a hard mask). height/width: output pixels,
    multiples of 64 in [64, 4096]. seed: in [0, 2**63 - 1].
    mode: a row of the `cones2.modes` table: "paper-exact" (the default; SPEC 4: Euler, CPU noise
    stream) or "fast" (DPM-Solver++ 2M, noise drawn on the device; docs/speed.md).
    layout_resize: how the layout's maps reach each attention level: "aligned-corners" (SPEC 3, the
    default in every mode) or "cell-centres" (each latent cell takes the map at its own centre; an
    opt-in deviation for small latent grids, `cones2.limits.LAYOUT_RESIZES`, docs/layout.md).
    gate_step, cache_interval: `fast` mode's work reuse (`cones2.reuse`, docs/speed.md): from step
    gate_step on, the conditional branch alone with cached cross-attention (clamped to [G, steps]);
    a full UNet pass every cache_interval unguided steps, shallow passes between (1 = off). None =
    the mode's default; paper-exact takes neither.
    """

    height: int = 768
    width: int = 768
    steps: int | None = None
    guidance_steps: int | None = None
    guidance_weight: float = 0.08
    cfg_scale: float = 7.5
    negative_weight: float = -1e8
    seed: int = 0
    mode: str = DEFAULT_MODE
    layout_resize: str = "aligned-corners"
    gate_step: int | None = None
    cache_interval: int | None = None

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.mode not in MODES:
            raise Cones2Error(f"must be one of {', '.join(MODES)}, got {quote(self.mode)}", "mode")
        if self.layout_resize not in LAYOUT_RESIZES:
            raise Cones2Error(f"must be one of {', '.join(LAYOUT_RESIZES)}, got {quote(self.layout_resize)}",
                              "layout_resize")
        mode = get_mode(self.mode)
        steps = mode.default_steps if self.steps is None else self.steps
        put("steps", limits.integer(steps, "steps", 1, MAX_STEPS))
        g = (mode.guidance_steps(self.steps) if self.guidance_steps is None
             else limits.integer(self.guidance_steps, "guidance_steps", 0, 10**6))
        put("guidance_steps", min(g, self.steps))
        self._resolve_reuse(mode)
        for side in ("height", "width"):
            v = limits.integer(getattr(self, side), side, 64, MAX_SIDE)
            if v % 64:
                raise Cones2Error(f"must be a multiple of 64, got {v}", side)
            put(side, v)
        put("guidance_weight", limits.number(self.guidance_weight, "guidance_weight", limits.GUIDANCE_WEIGHT))
        put("cfg_scale", limits.number(self.cfg_scale, "cfg_scale", limits.CFG_SCALE))
        put("negative_weight", limits.number(self.negative_weight, "negative_weight", limits.NEGATIVE_WEIGHT))
        put("seed", limits.integer(self.seed, "seed", 0, 2**63 - 1))

    def _resolve_reuse(self, mode) -> None:
        """gate_step / cache_interval: the mode's defaults, or the caller's values in `fast` mode only."""
        if self.mode == "paper-exact":    # values that reuse nothing round-trip (dataclasses.replace, PNGs)
            reuses = {"gate_step": self.gate_step is not None and self.gate_step < self.steps,
                      "cache_interval": self.cache_interval not in (None, 1)}
            for name in (n for n, bad in reuses.items() if bad):
                raise Cones2Error("is a fast-mode setting; paper-exact computes every step in full", name)
        gate = mode.gate_step(self.steps) if self.gate_step is None else limits.integer(
            self.gate_step, "gate_step", 0, 10**6)
        object.__setattr__(self, "gate_step", min(self.steps, max(gate, self.guidance_steps, 1)))
        interval = mode.cache_interval if self.cache_interval is None else self.cache_interval
        object.__setattr__(self, "cache_interval", limits.integer(interval, "cache_interval", 1, 1000))
