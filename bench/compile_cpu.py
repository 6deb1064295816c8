#!/usr/bin/env python
"""CPU backends in whole processes, alternated: eager `sdpa` (the CPU default before issue 11),
compiled `sdpa` (`torch.compile`, inductor) and the engine's own default (`onnxruntime` on an
export cached per model, when the export extra is installed).

The case of issue 11's CPU target: the tiny SD-2-shaped model (v-prediction, random weights) at
768 px, 8 steps, every step guided (so 16 UNet calls of batch 2), 2 subjects, paper-exact mode.
Each child process loads the engine, generates twice with the same request and reports load time,
the first generation (which, compiled, includes compilation) and the second (steady state), plus
its latents. Processes take the variants in turn, the order rotated every round. The run starts
with an empty inductor cache and an empty export cache (TORCHINDUCTOR_CACHE_DIR, CONES2_CACHE), so
the first compiled and the first default process pay compilation / export, the later ones find
them, as a second CLI run would. Latents of every process are compared with the first eager one.

    python bench/compile_cpu.py --rounds 3 --json bench/results/compile_cpu.json
    python bench/compile_cpu.py --variants eager,default --rounds 3 --json bench/results/cpu_default.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.results import write_result

VARIANTS = ("eager", "compiled", "default")
PROMPT = "a dog and a mug on the beach"
BOXES = {"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}


def child(args) -> int:
    t0 = time.perf_counter()
    import torch

    import cones2
    from cones2.default_model import tiny_model_dir
    from cones2.threads import configure_threads

    threads = configure_threads(args.threads)
    backend = None if args.variant == "default" else args.backend
    engine = cones2.Engine.from_pretrained(args.model or tiny_model_dir(), backend=backend,
                                           compile=args.variant == "compiled")
    loaded = time.perf_counter()
    layout = cones2.Layout.from_boxes(BOXES)
    kw = dict(seed=0, steps=args.steps, height=args.resolution, width=args.resolution, mode=args.mode, progress=False)
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        result = engine.generate(PROMPT, None, layout, **kw)
        runs.append({"seconds": time.perf_counter() - start, "timings": result.timings})
    torch.save(result.latents, args.latents)
    json.dump({"variant": args.variant, "backend": engine.default_backend, "threads": threads,
               "import_and_load_s": loaded - t0,
               "first_generation_s": runs[0]["seconds"], "second_generation_s": runs[1]["seconds"],
               "second_sampling_s": runs[1]["timings"]["sampling"], "process_work_s": time.perf_counter() - t0},
              open(args.report, "w"))
    return 0


def parent(args) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="cones2-cpu-processes-"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"), CONES2_CACHE=str(work / "cache"))
    env.pop("CONES2_BACKEND", None)      # `default` must see the engine's own choice
    if args.model is None:               # built in the user's cache, before the run's own empty one
        from cones2.default_model import tiny_model_dir

        args.model = str(tiny_model_dir())
    variants = args.variants.split(",")
    if variants[0] != "eager" or len(set(variants)) != len(variants) or not set(variants) <= set(VARIANTS):
        raise SystemExit(f"--variants: distinct names from {', '.join(VARIANTS)}, eager first (the yardstick)")
    common = ["--steps", str(args.steps), "--resolution", str(args.resolution), "--backend", args.backend,
              "--mode", args.mode] + (["--threads", str(args.threads)] if args.threads else []) + \
             (["--model", args.model] if args.model else [])
    runs = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            report, latents = work / f"{r}-{variant}.json", work / f"{r}-{variant}.pt"
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", variant, "--report", str(report), "--latents",
                            str(latents)] + common, check=True, env=env)
            row = json.loads(report.read_text()) | {"round": r, "process_wall_s": time.perf_counter() - start,
                                                    "latents": str(latents)}
            runs.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "latents"}), flush=True)
    exact = torch.load(next(r["latents"] for r in runs if r["variant"] == "eager"))
    for row in runs:
        row["max_abs_latent_diff_vs_paper_exact"] = (torch.load(row.pop("latents")) - exact).abs().max().item()

    def med(variant, key, rows=runs):
        values = [r[key] for r in rows if r["variant"] == variant]
        return statistics.median(values) if values else None

    summary = {"steady_generation_s": {v: med(v, "second_generation_s") for v in variants},
               "speedup_vs_eager_steady_generation": {v: med("eager", "second_generation_s") /
                                                      med(v, "second_generation_s") for v in variants},
               "process_wall_s_median": {v: med(v, "process_wall_s") for v in variants},
               "backend": {v: next(r["backend"] for r in runs if r["variant"] == v) for v in variants}}
    for v in variants[1:]:   # the first process of a variant finds empty caches, the others warm ones
        cold = next(r for r in runs if r["variant"] == v)
        warm = [r for r in runs if r["variant"] == v and r is not cold]
        summary[v] = {"process_wall_s_cold_cache": cold["process_wall_s"],
                      "first_generation_s_cold_cache": cold["first_generation_s"],
                      "import_and_load_s_cold_cache": cold["import_and_load_s"],
                      "process_wall_s_warm_cache_median": med(v, "process_wall_s", warm),
                      "first_generation_s_warm_cache_median": med(v, "first_generation_s", warm),
                      "import_and_load_s_warm_cache_median": med(v, "import_and_load_s", warm)}
    summary["max_abs_latent_diff_vs_paper_exact"] = {v: max(r["max_abs_latent_diff_vs_paper_exact"] for r in runs
                                                            if r["variant"] == v) for v in variants}
    summary["latent_scale"] = exact.abs().max().item()
    out = {"case": {
        "model": args.model or "tiny random SD-2-shaped (cones2.default_model.tiny_model_dir)",
        "resolution": args.resolution,
        "steps": args.steps, "guided_steps": args.steps, "subjects": 2, "backend": args.backend, "mode": args.mode,
        "torch": torch.__version__, "cpu_cores": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_result(args.json, out["case"], out, script="bench/compile_cpu.py")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="eager,compiled",
                   help="comma list, eager first: eager (--backend, sdpa), compiled (it, torch.compile), "
                        "default (the engine's own choice) (default: eager,compiled)")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant (default: 3)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=768)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--mode", default="paper-exact")
    p.add_argument("--model", default=None, help="default: the tiny random SD-2-shaped model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CLI's rule)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--latents", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
