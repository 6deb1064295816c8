"""Quality metrics of generated demo-world images (issue 7), scored with the exact detector.

- caption fidelity: each object the prompt names is present in its colour, with its kind;
- layout accuracy: the centre of the object found by its colour lies inside its assigned box;
- containment: the fraction of that object's pixels (the region of its colour) inside its box;
- instance fidelity: an object shows a subject instance's pattern, and (exact) also its kind and
  both its colours.
Evaluation prompts come from a world stream disjoint from the training data (`EVAL_SEED`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .detector import detect, find_colour_region
from .world import Instance, Scene, WorldConfig, make_scene

EVAL_SEED = 1_000_003                 # training uses seeds 0 and 1
EVAL_WORLD = WorldConfig(p_pattern=0.0, p_omit_colour=0.0, p_omit_background=0.0)
LAYOUT_MARGIN = 4                     # pixels added around each ground-truth box to make the layout box


def eval_scene(index: int, n_objects: int) -> Scene:
    """Evaluation prompt `index` with `n_objects` plain, fully named objects."""
    return make_scene(EVAL_SEED + n_objects, index, EVAL_WORLD, n_objects=n_objects)


def layout_boxes(scene: Scene, margin: int = LAYOUT_MARGIN) -> dict[str, tuple[float, float, float, float]]:
    """kind -> normalised (x0, y0, x1, y1): each object's box grown by `margin` pixels, clipped."""
    out = {}
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        grown = (max(0, x0 - margin), max(0, y0 - margin), min(scene.size, x1 + margin), min(scene.size, y1 + margin))
        out[o.kind] = tuple(v / scene.size for v in grown)
    return out


@dataclass(frozen=True)
class ObjectScore:
    """One named object in one image: present (its colour found), kind_ok (found with the right
    kind), in_box (the found region's centre inside the assigned box), inside (the share of the
    found region's pixels inside the box; None when not found), found_kind (the kind the detector
    gave the region; None when not found), area (the region's pixels), offset (how far the region's
    centre lies from the box centre, per axis in half box sides, the larger axis: <= 1 inside the box)."""

    colour: str
    kind: str
    present: bool
    kind_ok: bool
    in_box: bool
    inside: float | None = None
    found_kind: str | None = None
    area: int | None = None
    offset: float | None = None


def score_scene(image, scene: Scene, boxes: dict[str, tuple[float, float, float, float]]) -> list[ObjectScore]:
    """Score every object of `scene` (the prompt) in `image` against the layout `boxes`."""
    w, h = image.size
    scores = []
    for o in scene.objects:
        hit = find_colour_region(image, o.colour)
        found = None if hit is None else hit[0]
        in_box, inside, offset = False, None, None
        if found is not None:
            cx, cy = found.centre
            x0, y0, x1, y1 = boxes[o.kind]
            in_box = x0 * w <= cx <= x1 * w and y0 * h <= cy <= y1 * h
            inside = containment(hit[1], boxes[o.kind])
            offset = max(abs(2 * cx / w - x0 - x1) / (x1 - x0), abs(2 * cy / h - y0 - y1) / (y1 - y0))
        scores.append(ObjectScore(o.colour, o.kind, found is not None, found is not None and found.kind == o.kind,
                                  in_box, inside, None if found is None else found.kind,
                                  None if found is None else found.area, offset))
    return scores


def containment(region: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of the region's pixels (bool mask, H x W) whose centres lie inside the normalised box."""
    h, w = region.shape
    x0, y0, x1, y1 = box
    xs = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    in_box = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return float((region & in_box).sum() / max(1, region.sum()))


def summarize(scores: list[ObjectScore]) -> dict:
    """Fractions over objects: present, caption fidelity (colour and kind), layout accuracy; and
    containment, the mean share of a found object's pixels inside its box (over found objects);
    misses: how each fidelity miss happened, "asked->found" ("square->circle", "star->none")."""
    n = max(1, len(scores))
    inside = [s.inside for s in scores if s.inside is not None]
    misses = Counter(f"{s.kind}->{s.found_kind or 'none'}" for s in scores if not s.kind_ok)
    return {"objects": len(scores), "present": sum(s.present for s in scores) / n,
            "fidelity": sum(s.kind_ok for s in scores) / n, "layout": sum(s.in_box for s in scores) / n,
            "containment": float(np.mean(inside)) if inside else 0.0, "misses": dict(misses.most_common())}


def lost_with_guidance(scene: Scene, unguided: list[ObjectScore], guided: list[ObjectScore]) -> list[str]:
    """Kinds of the objects the unguided image has (found with their kind) and the guided one lost:
    what a negative paired fidelity change is made of."""
    return [o.kind for o, u, g in zip(scene.objects, unguided, guided) if u.kind_ok and not g.kind_ok]


OFFSET_BINS = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, float("inf")))


def guidance_loss_geometry(unguided: list[ObjectScore], guided: list[ObjectScore]) -> dict:
    """How the objects guidance lost differ from those it kept (paired scores of the same objects; only
    objects the unguided image has with their kind count). For each group: how many, the median of
    guided area / unguided area over those found in their colour with guidance (drawn smaller?), and
    of the unguided offset from the box (drawn far away, then pulled in?); and the share lost per bin
    of unguided offset."""
    pairs = [(u, g) for u, g in zip(unguided, guided) if u.kind_ok]
    out = {}
    for name, group in (("lost", [p for p in pairs if not p[1].kind_ok]), ("kept", [p for p in pairs if p[1].kind_ok])):
        ratios = [g.area / u.area for u, g in group if g.area]
        out[name] = {"objects": len(group),
                     "area_ratio_median": float(np.median(ratios)) if ratios else None,
                     "unguided_offset_median": float(np.median([u.offset for u, _ in group])) if group else None}
    by_offset = {}
    for lo, hi in OFFSET_BINS:
        lost = [not g.kind_ok for u, g in pairs if lo <= u.offset < hi]
        by_offset[f"{lo:g}-{hi:g}"] = {"objects": len(lost), "lost": float(np.mean(lost)) if lost else None}
    out["lost_by_unguided_offset"] = by_offset
    return out


def box_chance(scene: Scene, boxes) -> float:
    """Mean share of the image each object's box covers: layout accuracy of a uniformly random centre."""
    areas = [(boxes[o.kind][2] - boxes[o.kind][0]) * (boxes[o.kind][3] - boxes[o.kind][1]) for o in scene.objects]
    return sum(areas) / max(1, len(areas))


@dataclass(frozen=True)
class InstanceScore:
    """kind_present: an object of the instance's kind; pattern: one with its pattern; exact: one with
    its kind, its pattern and both its colours (main and second, either way round: on generated
    images the 60/40 split is not always measured on the right side)."""

    kind_present: bool
    pattern: bool
    exact: bool


def score_instance(image, instance: Instance) -> InstanceScore:
    found = detect(image)
    pattern = [d for d in found if d.pattern == instance.pattern]
    pair = {instance.colour, instance.second}
    exact = [d for d in pattern if d.kind == instance.kind and {d.colour, d.second} == pair]
    return InstanceScore(any(d.kind == instance.kind for d in found), bool(pattern), bool(exact))


def summarize_instances(scores: list[InstanceScore]) -> dict[str, float]:
    n = max(1, len(scores))
    return {"images": len(scores), **{k: sum(getattr(s, k) for s in scores) / n for k in asdict(scores[0])}} \
        if scores else {"images": 0}
