"""Segmentation for the demo world: find the objects in an image, their colour, kind, pattern and box.

The world is synthetic, so this can be exact on clean renders: every pixel is explained as a blend of
the background and one palette colour (antialiased outlines are exactly such blends), pixels at least
half object are foreground, and 4-connected foreground regions are objects. A region's kind is the
nearest of the ideal shapes' features (hole, solidity, extent, top-half share), except that a
region filling its box's corners is a square: on generated images (VAE decodings, with rounded
corners and bowed sides) the four features mistake squares for circles. Its pattern comes from how
pure its rows and columns are in colour. Accuracy on clean renders, VAE round trips and
hand-labelled generations: `bench/detector_check.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS

COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)        # (K, 3)
MIN_AREA = 6            # smaller regions are noise, not objects
SECOND_SHARE = 0.15     # a second colour covering at least this share of a region makes it patterned
MAX_RESIDUAL = 90.0     # RGB distance beyond which a pixel is no blend of background and a palette colour

# Typical feature values (hole share, solidity, extent, top-half share) of each kind, measured on
# clean renders of the world's shapes at 14-48 px (pixelation lowers the solidity of round shapes),
# and how far apart features count (their scale).
PROTOTYPES = {
    "circle":   (0.00, 0.955, 0.790, 0.500),
    "square":   (0.00, 1.000, 1.000, 0.500),
    "triangle": (0.00, 0.915, 0.530, 0.275),
    "star":     (0.00, 0.580, 0.410, 0.490),
    "heart":    (0.00, 0.895, 0.650, 0.675),
    "ring":     (0.25, 0.955, 0.790, 0.500),
}
FEATURE_SCALE = (0.05, 0.06, 0.06, 0.05)
# Only a square fills the corners of its bounding box. Corner fill (the filled share of the four
# corner cells, each CORNER of the box side) is at most 0.42 for every other kind on clean renders,
# 0.50 after the demo VAE, 0.46 on hand-labelled generations, while squares keep 0.69-0.99 through
# the VAE and 0.54-0.91 when generated. Decoding rounds corners and bows sides, which the four
# features read as a circle: they named 25 of 123 hand-labelled generated squares so.
CORNER = 0.25
SQUARE_CORNER_FILL = 0.6


@dataclass(frozen=True)
class Detection:
    """One found object. box: (x0, y0, x1, y1) in pixels, end exclusive; area in pixels.

    colour: the region's main palette colour; second: its other colour when patterned.
    """

    colour: str
    kind: str
    box: tuple[int, int, int, int]
    area: int
    pattern: str = "plain"
    second: str | None = None

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class PixelLabels:
    """Per-pixel explanation of an image (H, W): colour index (into COLOUR_NAMES), the object share
    alpha in [0, 1], and whether the pixel is foreground (alpha >= 0.5 and a plausible blend)."""

    colour: np.ndarray
    alpha: np.ndarray
    foreground: np.ndarray
    background: np.ndarray      # (3,) the estimated background colour


def label_pixels(image) -> PixelLabels:
    """Explain each pixel as background + alpha * (palette colour - background)."""
    rgb = _as_array(image)
    bg = estimate_background(rgb)
    d = _PALETTE - bg                                                    # (K, 3)
    p = rgb - bg                                                         # (H, W, 3)
    alpha = np.clip(np.einsum("hwc,kc->hwk", p, d) / (d * d).sum(-1), 0.0, 1.0)   # (H, W, K)
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)   # (H, W, K)
    best = residual.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    return PixelLabels(best, a, (a >= 0.5) & (r <= MAX_RESIDUAL), bg)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the image border (objects cover little of it), snapped to the nearest
    world background when it is close to one."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    median = np.median(border, axis=0)
    known = np.array(list(BACKGROUNDS.values()), np.float32)
    dist = np.linalg.norm(known - median, axis=-1)
    return known[dist.argmin()] if dist.min() < 40 else median.astype(np.float32)


def detect(image) -> list[Detection]:
    """All objects: 4-connected foreground regions of at least MIN_AREA pixels, largest first."""
    labels = label_pixels(image)
    found = []
    for region in components(labels.foreground):
        if region.sum() < MIN_AREA:
            continue
        counts = np.bincount(labels.colour[region], minlength=len(COLOUR_NAMES))
        order = counts.argsort()[::-1]
        main, other = int(order[0]), int(order[1])
        pattern, second = "plain", None
        if counts[other] >= SECOND_SHARE * region.sum():
            second = COLOUR_NAMES[other]
            pattern = pattern_of(labels.colour, region, main, other)
        found.append(_detection(region, COLOUR_NAMES[main], pattern, second))
    return sorted(found, key=lambda d: -d.area)


def find_colour(image, colour: str) -> Detection | None:
    """The largest region of pixels of `colour` (None when there is none of at least MIN_AREA)."""
    found = find_colour_region(image, colour)
    return None if found is None else found[0]


def find_colour_region(image, colour: str) -> tuple[Detection, np.ndarray] | None:
    """`find_colour` plus the region itself, a bool mask (H, W) (for containment in a box)."""
    labels = label_pixels(image)
    mask = labels.foreground & (labels.colour == COLOUR_NAMES.index(colour))
    regions = [r for r in components(mask) if r.sum() >= MIN_AREA]
    if not regions:
        return None
    region = max(regions, key=lambda r: r.sum())
    return _detection(region, colour, "plain", None), region


def _detection(region: np.ndarray, colour: str, pattern: str, second: str | None) -> Detection:
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Detection(colour, classify_shape(region), box, int(region.sum()), pattern, second)


# ---- shape and pattern --------------------------------------------------------------------------
def shape_features(region: np.ndarray) -> tuple[float, float, float, float]:
    """(hole share, solidity, extent, top-half share) of a bool mask holding one region."""
    holes = fill_holes(region) & ~region
    filled = region | holes
    area = float(filled.sum())
    ys, xs = np.nonzero(filled)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    extent = area / ((y1 - y0) * (x1 - x0))
    solidity = area / max(_hull_area(filled), 1.0)
    rows = filled[y0:y1].sum(axis=1).astype(np.float64)
    half = (y1 - y0) / 2
    weights = np.clip(half - np.arange(y1 - y0), 0.0, 1.0)              # a middle row counts half
    top = float((rows * weights).sum() / area)
    return float(holes.sum() / area), float(min(solidity, 1.0)), float(extent), top


def corner_fill(region: np.ndarray) -> float:
    """Mean filled share of the four corner cells of the region's bounding box (holes filled)."""
    filled = fill_holes(region)
    ys, xs = np.nonzero(filled)
    box = filled[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ch, cw = max(1, round(CORNER * box.shape[0])), max(1, round(CORNER * box.shape[1]))
    return float(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()]))


def _nearest_kind(features) -> str:
    f, scale = np.array(features), np.array(FEATURE_SCALE)
    return min(PROTOTYPES, key=lambda k: float((((f - np.array(PROTOTYPES[k])) / scale) ** 2).sum()))


def nearest_prototype(region: np.ndarray) -> str:
    """The kind whose ideal features are nearest (in units of FEATURE_SCALE)."""
    return _nearest_kind(shape_features(region))


def classify_shape(region: np.ndarray) -> str:
    """A square if the region fills its box's corners and has no hole; otherwise `nearest_prototype`."""
    features = shape_features(region)
    if features[0] < 0.05 and corner_fill(region) >= SQUARE_CORNER_FILL:
        return "square"
    return _nearest_kind(features)


def pattern_of(colour: np.ndarray, region: np.ndarray, main: int, other: int) -> str:
    """striped (rows pure, colours alternate down the object) or two-tone (columns pure)."""
    def purity(axis: int) -> float:
        m = region & ((colour == main) | (colour == other))
        a = (m & (colour == main)).sum(axis=axis)
        n = m.sum(axis=axis)
        keep = n > 0
        return float((np.maximum(a, n - a)[keep]).sum() / n[keep].sum())
    return "striped" if purity(1) >= purity(0) else "two-tone"


# ---- connected regions ---------------------------------------------------------------------------
def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a bool mask (H, W), each as a bool mask, in raster order of their
    first pixel. Min-label propagation with pointer jumping (vectorised; a few dozen passes)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        flat = new.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside]])     # jump to the label's own label
        if np.array_equal(new, lab):
            break
        lab = new
    return [lab == v for v in np.unique(lab[mask])]


def fill_holes(region: np.ndarray) -> np.ndarray:
    """The region plus every background pixel not 4-connected to the image border (computed on the
    region's bounding box with a one-pixel frame)."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(~region[y0:y1, x0:x1], 1, constant_values=True)
    outside = next(c for c in components(crop) if c[0, 0])
    out = region.copy()
    out[y0:y1, x0:x1] |= ~outside[1:-1, 1:-1]
    return out


def _hull_area(region: np.ndarray) -> float:
    """Area of the convex hull of the region's pixel squares (monotone chain + shoelace)."""
    ys, xs = np.nonzero(region)
    pts = sorted({(int(x) + dx, int(y) + dy) for x, y in zip(xs, ys) for dx in (0, 1) for dy in (0, 1)})
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]
