"""The bounds every user value must fall in, and the checks that enforce them.

Shared by `SamplingConfig`, `Layout`, the token lookup and the CLIs, so the CLI, the Python API and
gRPC refuse the same values with the same one-line message naming the field; a message quotes at
most a bounded prefix of what was sent (`errors.quote`).
"""
from __future__ import annotations

import math

from .errors import Cones2Error, quote

FLOAT32_MAX = 3.4028234663852886e38

# (low, high), both inclusive. Every documented default and every value of the reference
# implementation lies inside; beyond them the fp32 math overflows or the image is meaningless.
GUIDANCE_WEIGHT = (0.0, 10.0)       # g of SPEC 3 (default 0.08; sensible 0.05..0.10)
CFG_SCALE = (0.0, 100.0)            # classifier-free guidance (default 7.5)
NEGATIVE_WEIGHT = (-1e9, 0.0)       # w- (default -1e8); anything <= -1e4 is already a hard mask
STRENGTH = (0.0, 1e4)               # w+ per subject (default 2.5)

MAX_PROMPT_CHARS = 2000
MAX_SUBJECTS = 8                    # subjects (residuals or layout regions) per image
MAX_LAYOUT_COLORS = 64              # entries of a colour -> (subject, strength) table
MAX_STEPS = 1000
MAX_SIDE = 4096                     # output pixels per side
MAX_NAME_CHARS = 100                # a subject word
MAX_POSITIONS = 75                  # explicit token positions per subject: the 75 non-special slots

# Layout resize rules: how a full-size layout map becomes an attention level's h x w.
# "aligned-corners" is SPEC 3 (the reference): level cell i samples the map at pixel
# i * (H - 1) / (h - 1), which drifts up to half a cell from the cell's centre, outwards towards the
# image border. "cell-centres" samples at the centre of the pixels the cell covers,
# (i + 0.5) * H / h - 0.5 (`align_corners=False`). On a small latent grid the drift pushes masks off
# their boxes and squeezes objects (bench/results/quality.md section 4).
LAYOUT_RESIZES = ("aligned-corners", "cell-centres")


def number(value, field: str, bounds: tuple[float, float]) -> float:
    """`value` as a float in [low, high] (so finite, and finite in float32); else a Cones2Error."""
    low, high = bounds
    if isinstance(value, bool):
        raise Cones2Error(f"must be a number, got {quote(value)}", field)
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise Cones2Error(f"must be a number, got {quote(value)}", field) from None
    if not math.isfinite(value):
        raise Cones2Error(f"must be finite, got {value}", field)
    if not low <= value <= high:
        raise Cones2Error(f"must be in [{low:g}, {high:g}], got {value:g}", field)
    return value


def integer(value, field: str, low: int, high: int) -> int:
    """`value` as an int in [low, high] (a float with an integer value is accepted)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Cones2Error(f"must be an integer, got {quote(value)}", field)
    if not low <= value <= high:
        raise Cones2Error(f"must be in [{low}, {high}], got {quote(value)}", field)
    return value


def name(value, field: str) -> str:
    """A subject word: a non-empty string of at most MAX_NAME_CHARS characters."""
    if not isinstance(value, str) or not value.strip():
        raise Cones2Error(f"a subject must be a non-empty word, got {quote(value)}", field)
    if len(value) > MAX_NAME_CHARS:
        raise Cones2Error(f"a subject word has at most {MAX_NAME_CHARS} characters, got {quote(value)}", field)
    return value


def positions(values, field: str, last: int = MAX_POSITIONS) -> list[int]:
    """Explicit token positions: 1..MAX_POSITIONS integers in [1, last], at least one."""
    try:
        values = list(values)
    except TypeError:
        raise Cones2Error(f"must be a list of token positions, got {quote(values)}", field) from None
    if not values or len(values) > MAX_POSITIONS:
        raise Cones2Error(f"needs 1 to {MAX_POSITIONS} token positions, got {len(values)}", field)
    return [integer(v, field, 1, last) for v in values]


def guidance_steps_within(guidance_steps, steps: int) -> None:
    """An explicit guidance_steps above the steps would be silently cut to them: refuse it instead
    (`SamplingConfig` clamps, as the reference does for its config files)."""
    if isinstance(guidance_steps, (int, float)) and not isinstance(guidance_steps, bool) and guidance_steps > steps:
        raise Cones2Error(f"is {guidance_steps:g} but there are only {steps} steps", "guidance_steps")
