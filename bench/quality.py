"""Quality of the demo model (issue 7): what layout guidance and residuals do, measured with the
world's exact detector (`cones2_train.demo_world.detector`).

For 1..4 subjects, the same evaluation prompts and seeds are generated without and with layout
guidance (boxes = the prompt scene's ground-truth boxes grown by 4 px): caption fidelity (the object
is found in its colour with its kind) and layout accuracy (its centre lies in its box; `chance` is the
mean box area, the accuracy of a random centre). Then a residual is trained with `cones2_train` on 5
images of each subject instance and "a <kind> on a <background> background" is generated without and
with it (does the instance's pattern appear?), and both residuals are composed in one layout-guided
prompt. Prints tables, writes JSON.

    python bench/quality.py --model runs/demo/model --json bench/results/quality.json
    python bench/quality.py --quick --model DIR      # a small smoke subset
    python bench/quality.py --oracle --quick         # score the world's own renders: checks the metrics
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cones2_train.demo_world.instances import templates_for
from cones2_train.demo_world.metrics import (box_chance, eval_scene, layout_boxes, score_instance, score_scene,
                                             summarize, summarize_instances)
from cones2_train.demo_world.world import BACKGROUNDS, INSTANCES, Scene, Thing, instance_images, instance_scene

COMPOSE_BOXES = {"left": (0.02, 0.2, 0.48, 0.8), "right": (0.52, 0.2, 0.98, 0.8)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers directory of the demo model (default: the embedded default)")
    p.add_argument("--counts", default="1,2,3,4", help="subject counts to evaluate")
    p.add_argument("--prompts", type=int, default=100, help="prompts per subject count")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=16, help="requests per sampling loop")
    p.add_argument("--residual-steps", type=int, default=300)
    p.add_argument("--residual-lr", type=float, default=3e-4)
    p.add_argument("--residual-prompts", type=int, default=40, help="generations per residual setting")
    p.add_argument("--no-residuals", action="store_true")
    p.add_argument("--residual-dir", help="also save the trained residuals here")
    p.add_argument("--quick", action="store_true",
                   help="small subset: counts 2,3; 3 prompts; 4 steps; 3 residual steps")
    p.add_argument("--oracle", action="store_true", help="score renders of the prompts' own scenes (no model)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.counts, args.prompts, args.steps, args.batch = "2,3", 3, 4, 8
        args.residual_steps, args.residual_prompts = 3, 2
    args.counts = [int(c) for c in args.counts.split(",")]
    if any(not 1 <= c <= 4 for c in args.counts):
        p.error("--counts must lie in 1..4")
    return args


# ---- image sources: the model, or the world itself (--oracle) -----------------------------------------
class ModelImages:
    """Generations of a loaded engine, many requests per sampling loop."""

    def __init__(self, engine, steps: int, cfg: float, batch: int):
        self.engine, self.steps, self.cfg, self.batch = engine, steps, cfg, batch

    def layout(self, jobs: list[tuple[Scene, int, bool]]):
        """jobs: (prompt scene, seed, guided) -> images."""
        import cones2

        reqs = [self.engine.request(s.caption, None, cones2.Layout.from_boxes(layout_boxes(s)) if guided else None,
                                    seed=seed, steps=self.steps, cfg_scale=self.cfg) for s, seed, guided in jobs]
        return self._run(reqs)

    def prompts(self, jobs: list[tuple[str, dict, dict | None, int]]):
        """jobs: (prompt, residuals, boxes or None, seed) -> images."""
        import cones2

        reqs = [self.engine.request(p, subjects, cones2.Layout.from_boxes(boxes) if boxes else None, seed=seed,
                                    steps=self.steps, cfg_scale=self.cfg) for p, subjects, boxes, seed in jobs]
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
        for scene, seed, guided in jobs:
            if not guided:
                other = eval_scene(10_000_000 + seed, len(scene.objects))
                scene = Scene(tuple(Thing(o.kind, o.colour, b) for o, b in zip(scene.objects, other.boxes)),
                              scene.background, scene.caption)
            out.append(scene.render())
        return out

    def prompts(self, jobs):
        out = []
        for _, subjects, boxes, seed in jobs:
            things = []
            for k, (word, residual) in enumerate(sorted(subjects.items())):
                inst = INSTANCES[residual]
                box = instance_scene(inst, 1, seed).objects[0].box if not boxes else _pixel_box(boxes[word])
                things.append(Thing(inst.kind, inst.colour, box, inst.pattern, inst.second))
            if not things:
                things = [Thing("circle", "blue", (20, 20, 40, 40))]
            out.append(Scene(tuple(things), "sand", "").render())
        return out


def _pixel_box(box):
    x0, y0, x1, y1 = (int(round(v * 64)) for v in box)
    side = min(x1 - x0, y1 - y0, 26)
    return (x0, y0, x0 + side, y0 + side)


# ---- the evaluations -------------------------------------------------------------------------------------
def evaluate_layout(source, counts, prompts, progress=True) -> dict:
    results = {}
    for n in counts:
        t0 = time.perf_counter()
        scenes = [eval_scene(i, n) for i in range(prompts)]
        row = {"prompts": prompts, "chance": float(np.mean([box_chance(s, layout_boxes(s)) for s in scenes]))}
        for guided in (False, True):
            images = source.layout([(s, i, guided) for i, s in enumerate(scenes)])
            scores = [x for s, im in zip(scenes, images) for x in score_scene(im, s, layout_boxes(s))]
            row["guided" if guided else "unguided"] = summarize(scores)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[str(n)] = row
        if progress:
            print(f"  {n} subject(s): {row['seconds']} s", file=sys.stderr)
    return results


def evaluate_residuals(source, engine, args, templates_dir: Path) -> dict:
    """Train one residual per instance, then score generations without / with it, and composed."""
    residuals, results = {}, {}
    for name, inst in INSTANCES.items():
        if engine is None:                                   # oracle: the "residual" is the instance itself
            residuals[inst.kind] = name
            continue
        import cones2_train

        tpl = templates_dir / f"{name}.txt"
        tpl.write_text("\n".join(templates_for(inst.kind)) + "\n")
        cfg = cones2_train.TrainConfig(steps=args.residual_steps, lr=args.residual_lr, seed=0, templates=str(tpl))
        t0 = time.perf_counter()
        residual = cones2_train.train_residual(engine, instance_images(inst, 5, seed=0), inst.kind, cfg,
                                               progress=not args.no_progress)
        results.setdefault(name, {})["train_seconds"] = round(time.perf_counter() - t0, 1)
        if args.residual_dir:
            residual.save(Path(args.residual_dir) / f"{name}.safetensors")
        residuals[inst.kind] = residual
    backgrounds = list(BACKGROUNDS)
    for name, inst in INSTANCES.items():
        row = results.setdefault(name, {})
        for label, subjects in (("without", {}), ("with", {inst.kind: residuals[inst.kind]})):
            jobs = [(f"a {inst.kind} on a {backgrounds[i % len(backgrounds)]} background", subjects, None, i)
                    for i in range(args.residual_prompts)]
            row[label] = summarize_instances([score_instance(im, inst) for im in source.prompts(jobs)])
    # composition: both residuals in one prompt, each subject in its own half
    kinds = [inst.kind for inst in INSTANCES.values()]
    boxes = {kinds[0]: COMPOSE_BOXES["left"], kinds[1]: COMPOSE_BOXES["right"]}
    comp = {}
    for label, subjects in (("without", {}), ("with", {k: residuals[k] for k in kinds})):
        prompt = f"a {kinds[0]} and a {kinds[1]} on a {{}} background"
        jobs = [(prompt.format(backgrounds[i % len(backgrounds)]), subjects, boxes, i)
                for i in range(args.residual_prompts)]
        images = source.prompts(jobs)
        per = {name: [score_instance(im, inst).exact for im in images] for name, inst in INSTANCES.items()}
        comp[label] = {**{name: float(np.mean(v)) for name, v in per.items()},
                       "both": float(np.mean([all(x) for x in zip(*per.values())]))}
    results["composition"] = comp
    return results


# ---- report ------------------------------------------------------------------------------------------------
def format_tables(results: dict) -> str:
    lines = ["| subjects | prompts | fidelity w/o guidance | fidelity with | layout w/o guidance | layout with "
             "| chance |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, row in results["layout"].items():
        u, g = row["unguided"], row["guided"]
        lines.append(f"| {n} | {row['prompts']} | {u['fidelity']:.3f} | {g['fidelity']:.3f} | {u['layout']:.3f} | "
                     f"{g['layout']:.3f} | {row['chance']:.3f} |")
    res = results.get("residuals")
    if res:
        lines += ["", "| instance | images | kind present w/o / with | pattern w/o / with "
                  "| exact instance w/o / with |",
                  "|---|---:|---:|---:|---:|"]
        for name in INSTANCES:
            w, r = res[name]["without"], res[name]["with"]
            lines.append(f"| {name} | {r['images']} | {w['kind_present']:.2f} / {r['kind_present']:.2f} | "
                         f"{w['pattern']:.2f} / {r['pattern']:.2f} | {w['exact']:.2f} / {r['exact']:.2f} |")
        c = res["composition"]
        names = " + ".join(INSTANCES)
        lines.append(f"| composed ({names}) | | | | both exact: {c['without']['both']:.2f} / {c['with']['both']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = None
    if args.oracle:
        source = OracleImages()
    else:
        import cones2

        engine = cones2.Engine.from_pretrained(args.model)
        source = ModelImages(engine, args.steps, args.cfg, args.batch)
    t0 = time.perf_counter()
    results = {"model": "oracle" if args.oracle else (args.model or "embedded default"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
               "layout": evaluate_layout(source, args.counts, args.prompts, not args.no_progress)}
    if not args.no_residuals:
        with tempfile.TemporaryDirectory() as tmp:
            results["residuals"] = evaluate_residuals(source, engine, args, Path(tmp))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_tables(results))
    print(f"({results['seconds']} s; {args.steps} sampling steps, cfg {args.cfg}, threads {torch.get_num_threads()})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
