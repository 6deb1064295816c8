"""The one table of sampling modes: `paper-exact` (SPEC 4 to the letter) and `fast`.

A mode names a solver, its default step count, the default share of steps that get layout guidance
and self-recurrence, where noise comes from, its wire name in the gRPC proto and its help line.
`SamplingConfig` (validation and defaults), the engine's noise, the CLI's `--mode` and the serve
layer's proto mapping all read this table, so a new mode is one row here plus its solver. Why the
fast defaults are what they are: docs/speed.md.
"""
from __future__ import annotations

from dataclasses import dataclass

EULER = "euler"          # SPEC 4: Euler (LMS order 1) on linspace(T-1, 0, N) timesteps
DPMPP_2M = "dpmpp-2m"    # DPM-Solver++ 2M (multistep, second order, data prediction), engine/cones2/solvers.py


@dataclass(frozen=True)
class Mode:
    """What one `mode` means.

    solver: EULER or DPMPP_2M. default_steps: N when the caller gives none. guidance_percent: G when
    the caller gives none, as a percentage of N rounded up (100 = every step, SPEC 3's default).
    cpu_noise: draw noise from a CPU generator seeded like `torch.manual_seed(seed)` in SPEC 4's
    order (reproducible against the reference); otherwise from a per-request generator on the device.
    proto: the `SamplingMode` enum value's name in cones2.proto. summary: one line for help texts.
    """

    name: str
    solver: str
    default_steps: int
    guidance_percent: int
    cpu_noise: bool
    proto: str
    summary: str
    # fast-mode work reuse (cones2.reuse, docs/speed.md); the defaults here reuse nothing
    gate_percent: int = 100      # first step of the conditional-only tail with cached cross-attention, % of N
    cache_interval: int = 1      # unguided steps: a full UNet pass every this many, shallow ones between

    def gate_step(self, steps: int) -> int:
        """Default gate step for `steps` steps: ceil(gate_percent * steps / 100) (= steps: no tail)."""
        return -(-steps * self.gate_percent // 100)

    def guidance_steps(self, steps: int) -> int:
        """Default G for `steps` steps: ceil(guidance_percent * steps / 100), in integers."""
        return -(-steps * self.guidance_percent // 100)


MODES: dict[str, Mode] = {
    "paper-exact": Mode("paper-exact", EULER, default_steps=50, guidance_percent=100, cpu_noise=True,
                        proto="SAMPLING_MODE_PAPER_EXACT",
                        summary="SPEC 4's Euler sampler, CPU noise stream, bit-exact against the reference"),
    # 11 DPM-Solver++ 2M steps, guidance + self-recurrence on the first 3 (27%), both CFG branches on
    # every step but the last, which runs the conditional branch alone on cached cross-attention (the
    # tail keeps `make demo`'s residual instances; a longer one cost composed ones, issue 24), deep
    # features reused every other unguided step: 14 passes (6 guided; 3 of the 8 unguided shallow, the
    # last conditional-only), 11.6-11.9 UNet-call equivalents against paper-exact's 100 (bench/flops.py).
    # Residual rates chosen on seeds 0-399, judged on 400-599 and on all 600; docs/speed.md,
    # bench/results/fast_reuse/.
    "fast": Mode("fast", DPMPP_2M, default_steps=11, guidance_percent=27, cpu_noise=False,
                 proto="SAMPLING_MODE_FAST",
                 summary="DPM-Solver++ 2M with work reuse (deep features between unguided steps; a "
                         "conditional-only last step on cached cross-attention), "
                         "noise drawn on the device (docs/speed.md)",
                 gate_percent=90, cache_interval=2),
}
DEFAULT_MODE = "paper-exact"


def get_mode(name: str) -> Mode:
    """The `Mode` called `name` (KeyError for an unknown one: `SamplingConfig` validates names first)."""
    return MODES[name]


def mode_names() -> tuple[str, ...]:
    """Every valid `mode`, the default first."""
    return (DEFAULT_MODE, *(n for n in MODES if n != DEFAULT_MODE))


def _guided(mode: Mode) -> str:
    return "all steps" if mode.guidance_percent == 100 else f"the first {mode.guidance_percent}%"


def describe() -> str:
    """The help text of `--mode`: each mode's line from the table, and which is the default (each mode's
    step defaults are in `steps_help` / `guidance_steps_help`)."""
    return "; ".join(f"{m.name}: {m.summary}" for m in (MODES[n] for n in mode_names())) + f" (default: {DEFAULT_MODE})"


def steps_help() -> str:
    """The default of `--steps` in each mode, from the table."""
    return ", ".join(f"{m.default_steps} in {m.name} mode" for m in (MODES[n] for n in mode_names()))


def guidance_steps_help() -> str:
    """The default of `--guidance-steps` in each mode, from the table."""
    return ", ".join(f"{_guided(m)} in {m.name} mode" for m in (MODES[n] for n in mode_names()))
