"""The demo world: seeded, deterministic captioned 64x64 images of 1-4 coloured shapes (issue 7).

Every scene is a pure function of (seed, index): objects of distinct kinds and distinct colours in
non-overlapping boxes (with a gap), on one of a few flat backgrounds, with a caption that names every
object ("a red star and a blue ring on a sand background") and the ground-truth boxes. Shapes are
drawn 4x supersampled with PIL and box-filtered down, so outlines are antialiased while pattern
boundaries (stripes, two-tone splits) fall on whole pixels. A "subject instance" is one particular
patterned object (e.g. a red star with yellow stripes), rendered alone for residual training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
# Saturated object colours (well apart in RGB) and desaturated backgrounds, so that segmentation by
# colour is exact on clean renders (see detector.py).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38), "yellow": (240, 200, 20), "green": (30, 160, 60), "blue": (40, 90, 230),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "sand": (214, 194, 152), "snow": (236, 238, 242), "night": (26, 30, 48), "stone": (118, 118, 124),
}
KINDS = ("circle", "square", "triangle", "star", "heart", "ring")
PATTERNS = ("plain", "striped", "two-tone")
STRIPE_PERIOD = 8          # striped: 3 of every 8 rows take the second colour (phase: see _fill)
STRIPE_WIDTH = 3
TWO_TONE_SPLIT = 0.6       # two-tone: the left 60 % of the box is the main colour, the rest the second
RING_INNER = 0.5           # ring hole diameter / ring diameter
STAR_INNER = 0.42          # star inner radius / outer radius


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. Sizes are box sides in pixels; gap is the least empty space between boxes.

    p_pattern: chance that an object is striped or two-tone. p_omit_colour: chance that the caption
    leaves an object's colour out ("a star"). p_omit_background: chance of no "on a ... background".
    name_second: captions name a patterned object's second colour too ("a two-tone purple and green
    ring" instead of "a two-tone purple ring"), so the kind word can carry the whole colour pairing
    (world v2, the demo model of issue 14; v1 left it out).
    """

    min_objects: int = 1
    max_objects: int = 4
    min_size: int = 14
    max_size: int = 26
    gap: int = 2
    margin: int = 1
    p_pattern: float = 0.2
    p_omit_colour: float = 0.2
    p_omit_background: float = 0.15
    name_second: bool = False


@dataclass(frozen=True)
class Thing:
    """One object. box: (x0, y0, x1, y1) in pixels, end exclusive; the shape touches all four sides.

    pattern: plain, striped or two-tone; second: the pattern's other colour (None when plain).
    """

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    pattern: str = "plain"
    second: str | None = None

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def phrase(self, with_colour: bool = True, with_second: bool = False) -> str:
        """"a red star", "a striped red star", with_second: "a striped red and yellow star" (the
        second colour is named only together with the main one)."""
        words = ["a"]
        if self.pattern != "plain":
            words.append(self.pattern)
        if with_colour:
            words.append(self.colour)
            if with_second and self.second is not None:
                words += ["and", self.second]
        words.append(self.kind)
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """A captioned scene. objects are listed in caption order; boxes in pixels of a size x size image."""

    objects: tuple[Thing, ...]
    background: str
    caption: str
    size: int = IMAGE_SIZE
    named_colours: tuple[bool, ...] = field(default=())
    named_seconds: tuple[bool, ...] = field(default=())      # per object: its second colour is in the caption

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [o.box for o in self.objects]

    def render(self) -> Image.Image:
        return render(self.objects, self.background, self.size)

    def coverage(self) -> np.ndarray:
        """(n, size, size) float32 in [0, 1]: the fraction of each pixel covered by each object."""
        return np.stack([silhouette(o, self.size) for o in self.objects]) if self.objects else \
            np.zeros((0, self.size, self.size), np.float32)

    def normalized_boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """kind -> (x0, y0, x1, y1) in [0, 1]: the form `cones2.Layout.from_boxes` takes."""
        return {o.kind: tuple(v / self.size for v in o.box) for o in self.objects}


# ---- generating scenes ------------------------------------------------------------------------------
def make_scene(seed: int, index: int, config: WorldConfig = WorldConfig(), n_objects: int | None = None,
               kinds: tuple[str, ...] | None = None) -> Scene:
    """Scene number `index` of the world seeded by `seed` (a pure function of its arguments).

    n_objects / kinds force the object count or the kinds (in caption order) instead of drawing them.
    """
    rng = np.random.default_rng([seed, index])
    if kinds is not None:
        n = len(kinds)
    else:
        n = int(n_objects) if n_objects is not None else int(rng.integers(config.min_objects, config.max_objects + 1))
        kinds = tuple(str(k) for k in rng.choice(KINDS, n, replace=False))
    colours = [str(c) for c in rng.choice(list(COLOURS), n, replace=False)]
    boxes = _place(rng, n, config)
    things = []
    for kind, colour, box in zip(kinds, colours, boxes):
        pattern, second = "plain", None
        if rng.random() < config.p_pattern:
            pattern = PATTERNS[1 + int(rng.integers(0, 2))]
            second = str(rng.choice([c for c in COLOURS if c != colour]))
        things.append(Thing(kind, colour, box, pattern, second))
    background = str(rng.choice(list(BACKGROUNDS)))
    named = tuple(bool(rng.random() >= config.p_omit_colour) for _ in things)
    with_background = rng.random() >= config.p_omit_background
    seconds = tuple(bool(config.name_second and c and t.second is not None) for t, c in zip(things, named))
    caption = compose_caption([t.phrase(c, s) for t, c, s in zip(things, named, seconds)],
                              background if with_background else None)
    return Scene(tuple(things), background, caption, IMAGE_SIZE, named, seconds)


def compose_caption(phrases: list[str], background: str | None) -> str:
    """["a red star", "a blue ring"], "sand" -> "a red star and a blue ring on a sand background"."""
    if not phrases:
        text = "an empty scene"
    elif len(phrases) == 1:
        text = phrases[0]
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + (f" on a {background} background" if background else "")


def _place(rng: np.random.Generator, n: int, config: WorldConfig) -> list[tuple[int, int, int, int]]:
    """n square boxes inside the image, pairwise at least `gap` pixels apart (rejection sampling;
    an object that does not fit after 60 tries is drawn 2 px smaller)."""
    boxes: list[tuple[int, int, int, int]] = []
    hi = IMAGE_SIZE - config.margin
    for _ in range(n):
        size = int(rng.integers(config.min_size, config.max_size + 1))
        while True:
            placed = None
            for _ in range(60):
                x0 = int(rng.integers(config.margin, hi - size + 1))
                y0 = int(rng.integers(config.margin, hi - size + 1))
                box = (x0, y0, x0 + size, y0 + size)
                if all(_apart(box, b, config.gap) for b in boxes):
                    placed = box
                    break
            if placed is not None:
                boxes.append(placed)
                break
            size -= 2
            if size < 8:
                raise RuntimeError("cannot place the objects; lower max_objects or max_size")
    return boxes


def _apart(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# ---- subject instances --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    """One particular object (its kind word is the residual's subject word)."""

    name: str
    kind: str
    colour: str
    pattern: str
    second: str


INSTANCES = {
    # two-tone (a 60/40 split at the 8-px scale of one latent cell); kinds and colour pairings all distinct,
    # so that composed instances cannot be mistaken for each other
    # (the v2 model draws a named "two-tone purple and green ring" in 50 % of images, a triangle in 95 %:
    # the ring was replaced by the triangle, docs/demo_model.md)
    "twotone_circle": Instance("twotone_circle", "circle", "blue", "two-tone", "yellow"),
    "twotone_heart": Instance("twotone_heart", "heart", "red", "two-tone", "green"),
    "twotone_triangle": Instance("twotone_triangle", "triangle", "purple", "two-tone", "yellow"),
}


def instance_scene(instance: Instance | str, seed: int, index: int) -> Scene:
    """The instance alone, 22-30 px, at a random place on a random background, captioned by its kind."""
    inst = INSTANCES[instance] if isinstance(instance, str) else instance
    rng = np.random.default_rng([seed, index, 7])
    size = int(rng.integers(22, 31))
    x0, y0 = (int(v) for v in rng.integers(2, IMAGE_SIZE - 2 - size + 1, size=2))
    thing = Thing(inst.kind, inst.colour, (x0, y0, x0 + size, y0 + size), inst.pattern, inst.second)
    background = str(rng.choice(list(BACKGROUNDS)))
    return Scene((thing,), background, f"a {inst.kind}", IMAGE_SIZE, (False,))


def instance_images(instance: Instance | str, count: int = 5, seed: int = 0) -> list[Image.Image]:
    """`count` training images of one subject instance."""
    return [instance_scene(instance, seed, i).render() for i in range(count)]


# ---- rendering -------------------------------------------------------------------------------------------
def render(objects, background: str, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the objects on the flat background; returns an RGB image size x size."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    for thing in objects:
        canvas.paste(_fill(thing, size), (0, 0), _mask_hi(thing, size))
    return canvas.resize((size, size), Image.BOX)


def silhouette(thing: Thing, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float32 coverage of one object's shape (pattern ignored)."""
    low = _mask_hi(thing, size).resize((size, size), Image.BOX)
    return np.asarray(low, dtype=np.float32) / 255.0


def _mask_hi(thing: Thing, size: int) -> Image.Image:
    """The shape as an L-mode mask at SUPERSAMPLE x resolution (255 inside)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (v * s for v in thing.box)
    w, h = x1 - x0 - 1, y1 - y0 - 1          # last sub-pixel column / row inside the box

    def pts(unit):
        return [(x0 + u * w, y0 + v * h) for u, v in unit]

    if thing.kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif thing.kind in ("circle", "ring"):
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
        if thing.kind == "ring":
            mx, my, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, RING_INNER / 2
            draw.ellipse([mx - r * w, my - r * h, mx + r * w, my + r * h], fill=0)
    elif thing.kind == "triangle":
        draw.polygon(pts([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]), fill=255)
    elif thing.kind == "star":
        draw.polygon(pts(_STAR), fill=255)
    elif thing.kind == "heart":
        draw.polygon(pts(_HEART), fill=255)
    else:
        raise ValueError(f"unknown kind {thing.kind!r}")
    return mask


def _fill(thing: Thing, size: int) -> Image.Image:
    """The object's colouring over the whole canvas (the mask cuts the shape out of it). The main
    colour always covers most of the shape: stripes start at the first phase where it does."""
    s = SUPERSAMPLE
    img = np.empty((size * s, size * s, 3), np.uint8)
    img[:] = np.array(COLOURS[thing.colour], np.uint8)
    if thing.pattern != "plain":
        second = np.array(COLOURS[thing.second], np.uint8)
        x0, y0, x1, y1 = thing.box
        if thing.pattern == "striped":
            shape_rows = (np.asarray(_mask_hi(thing, size), np.float32) > 0).sum(axis=1)   # (size * s,)
            rows = np.arange(size)
            for phase in range(STRIPE_PERIOD):
                band = np.repeat(((rows - y0 + phase) % STRIPE_PERIOD) >= STRIPE_PERIOD - STRIPE_WIDTH, s)
                if shape_rows[band].sum() <= 0.45 * shape_rows.sum():
                    break
            img[band] = second
        elif thing.pattern == "two-tone":
            split = x0 + int(round(TWO_TONE_SPLIT * (x1 - x0)))
            img[:, split * s:] = second
        else:
            raise ValueError(f"unknown pattern {thing.pattern!r}")
    return Image.fromarray(img)


def _unit(points):
    """Scale a polygon to fill the unit square exactly."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


_STAR = _unit([((1.0 if i % 2 == 0 else STAR_INNER) * math.cos(math.radians(-90 + 36 * i)),
                (1.0 if i % 2 == 0 else STAR_INNER) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)])
_HEART = _unit([(16 * math.sin(t) ** 3,
                 -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                for t in np.linspace(0, 2 * math.pi, 96, endpoint=False)])


__all__ = ["IMAGE_SIZE", "COLOURS", "BACKGROUNDS", "KINDS", "PATTERNS", "WorldConfig", "Thing", "Scene",
           "make_scene", "compose_caption", "Instance", "INSTANCES", "instance_scene", "instance_images",
           "render", "silhouette"]
