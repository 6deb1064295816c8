#!/usr/bin/env python
"""Eager vs compiled (`torch.compile`, inductor) UNet on the CPU, whole processes alternated.

The case of issue 11's CPU target: the tiny SD-2-shaped model (v-prediction, random weights) at
768 px, 8 steps, every step guided (so 16 UNet calls of batch 2), 2 subjects, the `sdpa` attention
backend, paper-exact mode. Each child process loads the engine, generates twice with the same
request and reports load time, the first generation (which, compiled, includes compilation) and the
second (steady state), plus its latents. Processes alternate eager / compiled, starting side swapped
every round; the first compiled process finds an empty inductor cache (a fresh
TORCHINDUCTOR_CACHE_DIR for the whole run), the later ones a warm one, as a second CLI run would.
Latents of every process are compared with the first eager process (paper-exact, sdpa, eager).

    python bench/compile_cpu.py --rounds 3 --json bench/results/compile_cpu.json
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

PROMPT = "a dog and a mug on the beach"
BOXES = {"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}


def child(args) -> int:
    t0 = time.perf_counter()
    import torch

    import cones2
    from cones2.default_model import tiny_model_dir
    from cones2.threads import configure_threads

    threads = configure_threads(args.threads)
    engine = cones2.Engine.from_pretrained(args.model or tiny_model_dir(), backend=args.backend,
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
    json.dump({"variant": args.variant, "threads": threads, "import_and_load_s": loaded - t0,
               "first_generation_s": runs[0]["seconds"], "second_generation_s": runs[1]["seconds"],
               "second_sampling_s": runs[1]["timings"]["sampling"], "process_work_s": time.perf_counter() - t0},
              open(args.report, "w"))
    return 0


def parent(args) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="cones2-compile-bench-"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"))
    common = ["--steps", str(args.steps), "--resolution", str(args.resolution), "--backend", args.backend,
              "--mode", args.mode] + (["--threads", str(args.threads)] if args.threads else []) + \
             (["--model", args.model] if args.model else [])
    runs = []
    for r in range(args.rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
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

    def med(variant, key):
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    compiled_cold = next(r for r in runs if r["variant"] == "compiled")
    warm = [r for r in runs if r["variant"] == "compiled" and r is not compiled_cold]
    summary = {
        "steady_generation_s": {v: med(v, "second_generation_s") for v in ("eager", "compiled")},
        "speedup_steady_generation": med("eager", "second_generation_s") / med("compiled", "second_generation_s"),
        "eager_process_wall_s_median": med("eager", "process_wall_s"),
        "compiled_process_wall_s_cold_cache": compiled_cold["process_wall_s"],
        "compiled_first_generation_s_cold_cache": compiled_cold["first_generation_s"],
        "compiled_process_wall_s_warm_cache_median":
            statistics.median(r["process_wall_s"] for r in warm) if warm else None,
        "compiled_first_generation_s_warm_cache_median":
            statistics.median(r["first_generation_s"] for r in warm) if warm else None,
        "max_abs_latent_diff_vs_paper_exact": max(r["max_abs_latent_diff_vs_paper_exact"] for r in runs),
        "latent_scale": exact.abs().max().item(),
    }
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv), "case": {
        "model": args.model or "tiny random SD-2-shaped (cones2.default_model.tiny_model_dir)",
        "resolution": args.resolution,
        "steps": args.steps, "guided_steps": args.steps, "subjects": 2, "backend": args.backend, "mode": args.mode,
        "torch": torch.__version__, "cpu_cores": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="eager + compiled process pairs (default: 3)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=768)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--mode", default="paper-exact")
    p.add_argument("--model", default=None, help="default: the tiny random SD-2-shaped model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CLI's rule)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--latents", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
