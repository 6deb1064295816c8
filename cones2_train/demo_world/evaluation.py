"""The demo world's quality evaluation as a library: what layout guidance and residuals do to
images of the demo model, scored with the world's exact detector (`detector`, `metrics`).

`evaluate(Settings(...))` returns one dict (tests call it directly; `bench/quality.py` is its
command line). For 1..4 subjects the same evaluation prompts and seeds are generated without and
with layout guidance (boxes = the prompt scene's ground-truth boxes grown by `margin` px): caption
fidelity (the object is found in its colour with its kind), layout accuracy (its centre lies in its
box; `chance` is the mean box area) and containment (the share of a found object's pixels inside
its box); also how each fidelity miss happened, fidelity by object size, and the change of
fidelity with guidance paired by prompt, with a 95 % interval. Then one residual per subject
instance is trained with `cones2_train` on 5 images (or loaded from `residuals_from`) and
"a <kind> on a <background> background" is generated without and with it (does the exact
instance appear?), every pair of residuals is composed in one layout-guided prompt, and the
`make demo` layout is scored. `oracle=True` scores the world's own renders instead of a model:
a check of the metrics themselves. Results: bench/results/quality.md.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cones2.config import SamplingConfig
from cones2.limits import LAYOUT_RESIZES

from .instances import templates_for
from .metrics import (LAYOUT_MARGIN, box_chance, eval_scene, guidance_loss_geometry, layout_boxes, lost_with_guidance,
                      score_instance, score_scene, summarize, summarize_instances)
from .world import BACKGROUNDS, COLOURS, INSTANCES, Scene, Thing, instance_images, instance_scene

# Two 26-px boxes 6 px apart: the world's object scale (14-26 px). Boxes of 29 x 38 px with a 1-px gap,
# used before, made the model fill them and the two objects touch (one region to the detector).
COMPOSE_BOXES = {"left": (0.05, 0.3, 0.45, 0.7), "right": (0.55, 0.3, 0.95, 0.7)}
# `make demo`: two residual subjects and one plain, named subject, each in its box
DEMO_RESIDUALS = ("twotone_heart", "twotone_triangle")
DEMO_PLAIN = ("star", "blue")
DEMO_BOXES = {"heart": (0.05, 0.05, 0.45, 0.45), "star": (0.55, 0.05, 0.95, 0.45), "triangle": (0.3, 0.55, 0.7, 0.95)}
PAPER_EXACT_STEPS = 30   # the evaluation's step count in paper-exact mode (fast mode: the mode's own default)


@dataclass
class Settings:
    """One evaluation run. model: the demo model's diffusers directory (None: the embedded default).
    counts / prompts / first_prompt: subject counts and prompts first .. first + prompts - 1 of each
    (prompt i uses seed i). steps None: PAPER_EXACT_STEPS in paper-exact mode, the mode's default
    otherwise. Residuals: trained for `residual_steps` at `residual_lr` with `residual_train_prompt`
    (or loaded from `residuals_from`), scored on `residual_prompts` generations each (seeds first_residual_prompt onwards); `named` also
    scores prompts that spell each instance out. The guidance settings and `fast` mode's work-reuse
    knobs (gate_step, cache_interval; None = the mode's default) are `SamplingConfig`'s. unguided:
    also sample each layout prompt without guidance (fidelity without it and what guidance changes;
    False halves the layout part's work when only the guided figures matter)."""

    model: str | None = None
    counts: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    prompts: int = 100
    first_prompt: int = 0
    steps: int | None = None
    mode: str = "paper-exact"
    cfg: float = 7.5
    batch: int = 16
    residual_steps: int = 300
    residual_lr: float = 3e-4
    residual_prompts: int = 40
    first_residual_prompt: int = 0
    residual_train_prompt: str = "{}"
    no_residuals: bool = False
    instances: list[str] = field(default_factory=lambda: list(INSTANCES))
    residual_dir: str | None = None
    residuals_from: str | None = None
    named: bool = False
    guidance_steps: int | None = None
    strength: float = 2.5
    negative_weight: float = SamplingConfig.negative_weight
    layout_resize: str = LAYOUT_RESIZES[0]
    gate_step: int | None = None
    cache_interval: int | None = None
    unguided: bool = True
    margin: int = LAYOUT_MARGIN
    oracle: bool = False
    save_misses: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.steps is None:
            from cones2.modes import get_mode

            self.steps = PAPER_EXACT_STEPS if self.mode == "paper-exact" else get_mode(self.mode).default_steps
        unknown = [n for n in self.instances if n not in INSTANCES]
        if unknown or not self.instances:
            raise ValueError(f"instances: unknown {unknown} (choose from {', '.join(INSTANCES)})")
        if any(not 1 <= c <= 4 for c in self.counts):
            raise ValueError("counts must lie in 1..4")
        if self.first_prompt < 0 or self.first_residual_prompt < 0:
            raise ValueError("first_prompt and first_residual_prompt must be >= 0")

    def quick(self) -> "Settings":
        """A small smoke subset of these settings: counts 2,3; 3 prompts; 4 steps; 3 residual steps."""
        self.counts, self.prompts, self.steps, self.batch = [2, 3], 3, 4, 8
        self.residual_steps, self.residual_prompts = 3, 2
        return self


def evaluate(settings: Settings, engine=None) -> dict:
    """Run the evaluation `settings` describe and return its results (the JSON `bench/quality.py`
    writes as its payload). engine: an already-loaded `cones2.Engine` (default: load `settings.model`;
    ignored with `oracle`)."""
    s = settings
    if s.oracle:
        source, engine = OracleImages(), None
    else:
        if engine is None:
            import cones2

            engine = cones2.Engine.from_pretrained(s.model)
        source = ModelImages(engine, s.steps, s.cfg, s.batch, s.guidance_steps, s.strength, mode=s.mode,
                             layout_resize=s.layout_resize, negative_weight=s.negative_weight,
                             gate_step=s.gate_step, cache_interval=s.cache_interval)
    t0 = time.perf_counter()
    results = {"model": "oracle" if s.oracle else (s.model or "embedded default"), "settings": asdict(s),
               "layout": evaluate_layout(source, s.counts, s.prompts, s.progress, s.margin, s.first_prompt,
                                         s.save_misses, s.unguided)}
    if not s.no_residuals:
        with tempfile.TemporaryDirectory() as tmp:
            results["residuals"] = evaluate_residuals(source, engine, s, Path(tmp))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


# ---- image sources: the model, or the world itself (--oracle) -----------------------------------------
class ModelImages:
    """Generations of a loaded engine, many requests per sampling loop."""

    def __init__(self, engine, steps: int, cfg: float, batch: int, guidance_steps: int | None = None,
                 strength: float = 2.5, mode: str = "paper-exact", layout_resize: str = "aligned-corners",
                 negative_weight: float = SamplingConfig.negative_weight, gate_step: int | None = None,
                 cache_interval: int | None = None):
        self.engine, self.batch, self.strength = engine, batch, strength
        self.settings = dict(steps=steps, cfg_scale=cfg, mode=mode, guidance_steps=guidance_steps,
                             layout_resize=layout_resize, negative_weight=negative_weight, gate_step=gate_step,
                             cache_interval=cache_interval)

    def _layout(self, boxes):
        import cones2

        return cones2.Layout.from_boxes(boxes, strengths=self.strength) if boxes else None

    def layout(self, jobs: list[tuple[Scene, dict, int, bool]]):
        """jobs: (prompt scene, layout boxes, seed, guided) -> images."""
        reqs = [self.engine.request(s.caption, None, self._layout(boxes) if guided else None, seed=seed,
                                    **self.settings) for s, boxes, seed, guided in jobs]
        return self._run(reqs)

    def prompts(self, jobs: list[tuple[str, dict, dict | None, int]]):
        """jobs: (prompt, residuals, boxes or None, seed) -> images."""
        reqs = [self.engine.request(p, subjects, self._layout(boxes), seed=seed, **self.settings)
                for p, subjects, boxes, seed in jobs]
        return self._run(reqs)

    def _run(self, reqs):
        out = []
        for i in range(0, len(reqs), self.batch):
            out += [g.image for g in self.engine.generate_batch(reqs[i : i + self.batch], progress=False)]
        return out


class OracleImages:
    """The world's own renders: guided = the prompt's scene, unguided = its objects at other places,
    a residual prompt = the instance (with) or a plain object of that kind (without)."""

    def layout(self, jobs):
        out = []
        for scene, _boxes, seed, guided in jobs:
            if not guided:
                other = eval_scene(10_000_000 + seed, len(scene.objects))
                scene = Scene(tuple(Thing(o.kind, o.colour, b) for o, b in zip(scene.objects, other.boxes)),
                              scene.background, scene.caption)
            out.append(scene.render())
        return out

    def prompts(self, jobs):
        out = []
        for prompt, subjects, boxes, seed in jobs:
            things = []
            for k, (word, residual) in enumerate(sorted(subjects.items())):
                inst = INSTANCES[residual]
                box = instance_scene(inst, 1, seed).objects[0].box if not boxes else _pixel_box(boxes[word])
                things.append(Thing(inst.kind, inst.colour, box, inst.pattern, inst.second))
            for word in sorted(set(boxes or ()) - set(subjects)):          # plain subjects named with a colour
                colour = next((c for c in COLOURS if f"a {c} {word}" in prompt), None)
                if colour is not None:
                    things.append(Thing(word, colour, _pixel_box(boxes[word])))
            if not things:
                things = [Thing("circle", "blue", (20, 20, 40, 40))]
            out.append(Scene(tuple(things), "sand", "").render())
        return out


def _pixel_box(box):
    x0, y0, x1, y1 = (int(round(v * 64)) for v in box)
    side = min(x1 - x0, y1 - y0, 26)
    return (x0, y0, x0 + side, y0 + side)


# ---- the evaluations -------------------------------------------------------------------------------------
SIZE_BUCKETS = ((14, 18), (19, 22), (23, 26))     # object side in pixels (the world draws 14-26)


def fidelity_by_size(scenes, scores) -> dict:
    """Caption fidelity per bucket of the object's ground-truth side: guidance squeezes objects the
    model draws larger than their box, so its misses concentrate on small boxes."""
    sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for s in scenes for o in s.objects]
    out = {}
    for lo, hi in SIZE_BUCKETS:
        hits = [sc.kind_ok for side, sc in zip(sides, scores) if lo <= side <= hi]
        out[f"{lo}-{hi}px"] = {"objects": len(hits), "fidelity": float(np.mean(hits)) if hits else None}
    return out


def paired_fidelity_change(per_prompt: dict[bool, list[list[bool]]]) -> dict:
    """Fidelity with minus without guidance, paired by prompt and seed, with a 95 % interval. The
    prompt is the unit (its objects share one image): d_p = mean over its objects of (with - without),
    interval = mean(d) +- 1.96 * sd(d) / sqrt(P)."""
    d = np.array([np.mean(np.array(g, float) - np.array(u, float))
                  for g, u in zip(per_prompt[True], per_prompt[False])])
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)]}


def evaluate_layout(source, counts, prompts, progress=True, margin: int = LAYOUT_MARGIN, first: int = 0,
                    misses_dir: Path | None = None, unguided: bool = True) -> dict:
    """Prompts first .. first + prompts - 1 of each subject count; prompt i is sampled with seed i.
    misses_dir: also save the prompts where guidance lost an object (`save_guidance_misses`).
    unguided=False: the guided images only (no comparison with unguided ones)."""
    results = {}
    for n in counts:
        t0 = time.perf_counter()
        indices = range(first, first + prompts)
        scenes = [eval_scene(i, n) for i in indices]
        boxes = [layout_boxes(s, margin) for s in scenes]
        row = {"prompts": prompts, "chance": float(np.mean([box_chance(s, b) for s, b in zip(scenes, boxes)]))}
        per_prompt, images = {}, {}
        for guided in ((False, True) if unguided else (True,)):
            images[guided] = source.layout([(s, b, i, guided) for i, s, b in zip(indices, scenes, boxes)])
            per_prompt[guided] = [score_scene(im, s, b) for s, b, im in zip(scenes, boxes, images[guided])]
            scores = [x for p in per_prompt[guided] for x in p]
            row["guided" if guided else "unguided"] = {**summarize(scores), "by_size": fidelity_by_size(scenes, scores)}
        if not unguided:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results[str(n)] = row
            continue
        row["fidelity_change"] = paired_fidelity_change({g: [[x.kind_ok for x in p] for p in per_prompt[g]]
                                                         for g in per_prompt})
        row["guidance_losses"] = guidance_loss_geometry(*([x for p in per_prompt[g] for x in p] for g in (False, True)))
        if misses_dir is not None:
            row["saved_misses"] = save_guidance_misses(Path(misses_dir), n, indices, scenes, boxes, images, per_prompt)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[str(n)] = row
        if progress:
            print(f"  {n} subject(s): {row['seconds']} s", file=sys.stderr)
    return results


def save_guidance_misses(folder: Path, n: int, indices, scenes, boxes, images: dict, per_prompt: dict) -> int:
    """Write `<n>subjects_prompt<i>_<kinds>.png`, the unguided image beside the guided one with its layout
    drawn, for each prompt where guidance lost an object (`metrics.lost_with_guidance`). Returns how
    many were written."""
    from PIL import Image

    from cones2 import Layout
    from cones2.image import draw_layout

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for k, i in enumerate(indices):
        lost = lost_with_guidance(scenes[k], per_prompt[False][k], per_prompt[True][k])
        if not lost:
            continue
        image = images[True][k]
        guided = draw_layout(image, Layout.from_boxes(boxes[k]).masks(image.height, image.width))
        unguided = images[False][k].convert("RGB").resize(guided.size, Image.NEAREST)
        sheet = Image.new("RGB", (2 * guided.width + 4, guided.height), "white")
        sheet.paste(unguided, (0, 0))
        sheet.paste(guided, (guided.width + 4, 0))
        sheet.save(folder / f"{n}subjects_prompt{i}_{'-'.join(lost)}.png")
        written += 1
    return written


def evaluate_residuals(source, engine, args: "Settings", templates_dir: Path) -> dict:
    """Train (or load) one residual per instance, then score generations without / with it, and
    every pair of residuals (of different kinds) composed in one layout-guided prompt."""
    chosen = {name: INSTANCES[name] for name in args.instances}
    residuals, results = {}, {}
    for name, inst in chosen.items():
        if engine is None:                                   # oracle: the "residual" is the instance itself
            residuals[name] = name
            continue
        if args.residuals_from:
            import cones2

            residuals[name] = cones2.Residual.load(Path(args.residuals_from) / f"{name}.safetensors")
            continue
        import cones2_train

        tpl = templates_dir / f"{name}.txt"
        tpl.write_text("\n".join(templates_for(inst.kind)) + "\n")
        cfg = cones2_train.TrainConfig(steps=args.residual_steps, lr=args.residual_lr, seed=0, templates=str(tpl),
                                       train_prompt=args.residual_train_prompt)
        t0 = time.perf_counter()
        residual = cones2_train.train_residual(engine, instance_images(inst, 5, seed=0), inst.kind, cfg,
                                               progress=args.progress)
        results.setdefault(name, {})["train_seconds"] = round(time.perf_counter() - t0, 1)
        if args.residual_dir:
            residual.save(Path(args.residual_dir) / f"{name}.safetensors")
        residuals[name] = residual
    backgrounds = list(BACKGROUNDS)
    for name, inst in chosen.items():
        row = results.setdefault(name, {})
        for label, subjects in (("without", {}), ("with", {inst.kind: residuals[name]})):
            jobs = [(f"a {inst.kind} on a {backgrounds[i % len(backgrounds)]} background", subjects, None, i)
                    for i in residual_seeds(args)]
            row[label] = summarize_instances([score_instance(im, inst) for im in source.prompts(jobs)])
        if args.named and engine is not None:            # the ceiling: the prompt spells the instance out (world v2)
            phrase = Thing(inst.kind, inst.colour, (0, 0, 1, 1), inst.pattern, inst.second).phrase(True, True)
            jobs = [(f"{phrase} on a {backgrounds[i % len(backgrounds)]} background", {}, None, i)
                    for i in residual_seeds(args)]
            row["named"] = summarize_instances([score_instance(im, inst) for im in source.prompts(jobs)])
    # composition: two residuals in one prompt, each subject in its own half
    comp = {}
    names = list(chosen)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if chosen[a].kind != chosen[b].kind]
    for a, b in pairs:
        ka, kb = chosen[a].kind, chosen[b].kind
        boxes = {ka: COMPOSE_BOXES["left"], kb: COMPOSE_BOXES["right"]}
        entry = {}
        for label, subjects in (("without", {}), ("with", {ka: residuals[a], kb: residuals[b]})):
            prompt = f"a {ka} and a {kb} on a {{}} background"
            jobs = [(prompt.format(backgrounds[i % len(backgrounds)]), subjects, boxes, i)
                    for i in residual_seeds(args)]
            images = source.prompts(jobs)
            per = {n: [score_instance(im, chosen[n]).exact for im in images] for n in (a, b)}
            entry[label] = {**{n: float(np.mean(v)) for n, v in per.items()},
                            "both": float(np.mean([all(x) for x in zip(*per.values())]))}
        comp[f"{a}+{b}"] = entry
    results["composition"] = comp
    if all(n in chosen for n in DEMO_RESIDUALS):
        results["demo"] = evaluate_demo(source, {n: residuals[n] for n in DEMO_RESIDUALS}, residual_seeds(args))
    return results


def exact_rates(residuals: dict) -> dict[str, float]:
    """The seven exact-instance rates with the residuals, by name, from `evaluate_residuals`' result:
    "alone <instance>", "composed <a>+<b>" (both exact), "make demo" (both residual instances exact).
    The figures issue 24's residual bound is judged on (bench/residual_gap.py, bench/fast_quality.py)."""
    out = {f"alone {n}": residuals[n]["with"]["exact"] for n in INSTANCES if n in residuals}
    out.update({f"composed {pair}": c["with"]["both"] for pair, c in residuals["composition"].items()})
    if "demo" in residuals:
        out["make demo"] = residuals["demo"]["with"]["both"]
    return out


def residual_seeds(args: "Settings") -> range:
    """Residual prompt i is sampled with seed i (and background i mod 8): first_residual_prompt onwards."""
    return range(args.first_residual_prompt, args.first_residual_prompt + args.residual_prompts)


def evaluate_demo(source, residuals: dict, seeds: range) -> dict:
    """The `make demo` layout: both residual instances exact, the plain subject found in its colour
    with its kind, and every subject's region centred in its box (layout) / inside it (containment)."""
    backgrounds = list(BACKGROUNDS)
    insts = [INSTANCES[n] for n in DEMO_RESIDUALS]
    kind, colour = DEMO_PLAIN
    words = [i.kind for i in insts]
    scene = Scene(tuple(Thing(i.kind, i.colour, (0, 0, 1, 1)) for i in insts) + (Thing(kind, colour, (0, 0, 1, 1)),),
                  "sand", "")
    out = {}
    for label, subjects in (("without", {}), ("with", {i.kind: residuals[n] for n, i in zip(DEMO_RESIDUALS, insts)})):
        jobs = [(f"a {words[0]}, a {words[1]} and a {colour} {kind} on a {backgrounds[i % len(backgrounds)]} "
                 "background", subjects, DEMO_BOXES, i) for i in seeds]
        exact, plain, layout, inside = [], [], [], []
        for im in source.prompts(jobs):
            hits = [score_instance(im, inst) for inst in insts]
            exact.append([h.exact for h in hits])
            (star,) = score_scene(im, Scene(scene.objects[2:], "sand", ""), DEMO_BOXES)
            plain.append(star.kind_ok)
            in_box, share = [star.in_box], [star.inside] if star.inside is not None else []
            for inst in insts:                    # the instances by their main colour
                (o,) = score_scene(im, Scene((Thing(inst.kind, inst.colour, (0, 0, 1, 1)),), "sand", ""), DEMO_BOXES)
                in_box.append(o.in_box)
                share += [o.inside] if o.inside is not None else []
            layout.append(float(np.mean(in_box)))
            inside.append(float(np.mean(share)) if share else 0.0)
        out[label] = {**{n: float(np.mean([e[k] for e in exact])) for k, n in enumerate(DEMO_RESIDUALS)},
                      "both": float(np.mean([all(e) for e in exact])), "plain_fidelity": float(np.mean(plain)),
                      "all": float(np.mean([all(e) and p for e, p in zip(exact, plain)])),
                      "layout": float(np.mean(layout)), "containment": float(np.mean(inside))}
    return out


# ---- report ------------------------------------------------------------------------------------------------
def layout_details(layout: dict) -> list[str]:
    """Per subject count: how each fidelity miss happened, fidelity by object size, the paired change
    of fidelity with guidance with its 95 % interval, and how the objects guidance lost differ from
    those it kept (size and unguided place: `metrics.guidance_loss_geometry`)."""
    def row_lines(title, fmt):
        return ["", title, *[f"- {n} subject(s): {fmt(row)}" for n, row in layout.items()]]

    def misses(row):
        return "; ".join(f"{label} " + (", ".join(f"{k} {v}" for k, v in row[key]["misses"].items()) or "none")
                         for label, key in (("w/o", "unguided"), ("with", "guided")))

    def sizes(row):
        u, g = row["unguided"]["by_size"], row["guided"]["by_size"]
        return "; ".join(f"{b} {u[b]['fidelity']:.2f} / {g[b]['fidelity']:.2f} ({g[b]['objects']})"
                         for b in g if g[b]["objects"])

    def change(row):
        c = row["fidelity_change"]
        return f"{c['mean']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"

    def geometry(row):
        g = row["guidance_losses"]

        def group(name):
            x = g[name]
            if not x["objects"]:
                return f"{name} 0"
            ratio = "-" if x["area_ratio_median"] is None else f"{x['area_ratio_median']:.2f}"
            return f"{name} {x['objects']}: area with / w/o {ratio}, offset w/o {x['unguided_offset_median']:.2f}"

        bins = ", ".join(f"{b} {v['lost']:.3f} ({v['objects']})" for b, v in g["lost_by_unguided_offset"].items()
                         if v["objects"])
        return f"{group('lost')}; {group('kept')}; share lost by offset w/o: {bins}"

    if not layout:
        return []
    return (row_lines("fidelity misses (asked kind -> kind found in that colour):", misses)
            + row_lines("fidelity w/o / with guidance by object side (objects):", sizes)
            + row_lines("fidelity with minus without guidance, paired by prompt (95 % interval):", change)
            + row_lines("objects guidance lost vs kept (medians; offset: unguided centre from the box centre in half "
                        "box sides, <= 1 inside):", geometry))


def format_tables(results: dict) -> str:
    lines = ["| subjects | prompts | fidelity w/o guidance | fidelity with | layout w/o guidance | layout with "
             "| chance | containment w/o / with |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, row in results["layout"].items():
        u, g = row.get("unguided", dict.fromkeys(("fidelity", "layout", "containment"), float("nan"))), row["guided"]
        lines.append(f"| {n} | {row['prompts']} | {u['fidelity']:.3f} | {g['fidelity']:.3f} | {u['layout']:.3f} | "
                     f"{g['layout']:.3f} | {row['chance']:.3f} | {u['containment']:.3f} / {g['containment']:.3f} |")
    if all("unguided" in row for row in results["layout"].values()):
        lines += layout_details(results["layout"])
    res = results.get("residuals")
    if res:
        lines += ["", "| instance | images | kind present w/o / with | pattern w/o / with "
                  "| exact instance w/o / with |",
                  "|---|---:|---:|---:|---:|"]
        for name in [n for n in res if n in INSTANCES]:
            w, r = res[name]["without"], res[name]["with"]
            lines.append(f"| {name} | {r['images']} | {w['kind_present']:.2f} / {r['kind_present']:.2f} | "
                         f"{w['pattern']:.2f} / {r['pattern']:.2f} | {w['exact']:.2f} / {r['exact']:.2f} |")
        for pair, c in res["composition"].items():
            lines.append(f"| composed ({pair.replace('+', ' + ')}, layout-guided) | | | | both exact: "
                         f"{c['without']['both']:.2f} / {c['with']['both']:.2f} |")
        named = [f"{n} {res[n]['named']['exact']:.2f}" for n in res if n in INSTANCES and "named" in res[n]]
        if named:
            lines += ["", "exact instance when the prompt spells it out (no residual): " + ", ".join(named)]
        d = res.get("demo")
        if d:
            pairs = "; ".join(f"{label} {d['without'][k]:.2f} / {d['with'][k]:.2f}" for label, k in (
                ("both exact", "both"), ("plain subject", "plain_fidelity"), ("all three", "all"),
                ("layout", "layout"), ("containment", "containment")))
            lines += ["", f"`make demo` layout ({' + '.join(DEMO_RESIDUALS)} residuals + a "
                      f"{' '.join(DEMO_PLAIN[::-1])}), without / with the residuals: {pairs}"]
    return "\n".join(lines)
