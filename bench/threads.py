"""Which torch thread count and CPU backend make whole `cones2-engine` processes fastest, idle and loaded.

    python bench/threads.py                                    # issue 29's case: rule vs 1 vs 2 threads, idle
    python bench/threads.py --burners 0,1,2 --variants 1,2,rule --repeats 3 --json bench/results/threads_issue29.json
    python bench/threads.py --variants sdpa:rule,onnxruntime:rule --generations 1,4 --burners 0,1

Each round runs one process per (condition, variant) and rotates the variants' order every round, so
a change in the machine's load hits every variant alike. Conditions: `--burners N` starts N busy-loop
processes, each pinned to its own core, for the whole condition (0 = nothing else running). A
variant is `[BACKEND:]THREADS`, THREADS one of N (`--threads N`), `rule` (no `--threads`: the default
of `cones2.threads`), `torch` (torch's own default count) or `omp1` (OMP_NUM_THREADS=1). With
`--generations 1` the process is `cones2-engine generate` (the CLI's common case); with more, a small
driver builds one engine and generates that many images in the process (a server's case). The case
is a tiny random SD-2-shaped model at 768 px, 8 steps all guided, two subjects with boxes.
The JSON keeps every run with the 1-minute load average after it, and the machine's core counts.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from harness.results import write_result

TIMES = re.compile(r"\(([\d.]+)s: sampling ([\d.]+)s")
PROMPT = "a dog and a mug on the beach"
BOXES = {"dog": (0.0, 0.3, 0.5, 1.0), "mug": (0.5, 0.4, 1.0, 1.0)}

# The several-generations case: one engine, N images, times on stdout (the CLI's default thread rule).
DRIVER = """
import sys, time
start = time.perf_counter()
import cones2
from cones2.threads import configure_threads
model, backend, steps, size, n, threads = sys.argv[1:7]
configure_threads(int(threads) if threads != "rule" else None)
engine = cones2.Engine.from_pretrained(model, backend=None if backend == "default" else backend)
layout = cones2.Layout.from_boxes({boxes!r})
for seed in range(int(n)):
    engine.generate({prompt!r}, {{}}, layout, seed=seed, steps=int(steps), guidance_steps=int(steps),
                    height=int(size), width=int(size), progress=False)
print(f"DONE {{time.perf_counter() - start:.3f}}")
"""


def torch_default_threads(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def parse_variant(variant: str) -> tuple[str, str]:
    backend, _, threads = variant.rpartition(":")
    return backend or "default", threads


def command_for(variant: str, generations: int, args, model: str, out: str, env: dict,
                torch_default: int) -> tuple[list[str], dict]:
    backend, threads = parse_variant(variant)
    run_env = env | {"OMP_NUM_THREADS": "1"} if threads == "omp1" else env
    count = {"torch": str(torch_default), "rule": "rule", "omp1": "rule"}.get(threads, threads)
    if generations > 1:
        driver = DRIVER.format(boxes=BOXES, prompt=PROMPT)
        return [sys.executable, "-c", driver, model, backend, str(args.steps), str(args.resolution),
                str(generations), count], run_env
    cmd = [str(Path(sys.executable).parent / "cones2-engine"), "generate", "--model", model, "--prompt", PROMPT,
           "--steps", str(args.steps), "--guidance-steps", str(args.steps), "--resolution", str(args.resolution),
           "--seed", "0", "--out", out, "--no-progress"]
    for name, box in BOXES.items():
        cmd += ["--box", f"{name}={','.join(map(str, box))}"]
    if backend != "default":
        cmd += ["--backend", backend]
    if count != "rule":
        cmd += ["--threads", count]
    return cmd, run_env


@contextmanager
def burners(count: int):
    """`count` busy-loop processes, each pinned to its own core (cores 0, 1, ...)."""
    procs = []
    cores = sorted(os.sched_getaffinity(0))
    try:
        for i in range(count):
            code = f"import os; os.sched_setaffinity(0, {{{cores[i % len(cores)]}}})\nwhile True: pass"
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
        time.sleep(1.0 if count else 0.0)      # let them reach their cores before the first run
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def summarise(runs: list[dict]) -> dict:
    proc_s = [r["process_s"] for r in runs]
    return {"process_median_s": statistics.median(proc_s), "process_min_s": min(proc_s),
            "process_max_s": max(proc_s), "loadavg_1m": [r["loadavg_1m"] for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers directory (default: the tiny random model, built in the cache)")
    p.add_argument("--variants", default="rule,1,2", help="comma-separated [BACKEND:]THREADS (see above)")
    p.add_argument("--burners", default="0", help="comma-separated counts of busy cores, one condition each")
    p.add_argument("--generations", default="1", help="comma-separated images per process")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs every variant once)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=768)
    p.add_argument("--json", default="bench/results/threads_issue29.json", help="write every run here")
    args = p.parse_args(argv)

    from cones2.default_model import tiny_model_dir

    model = args.model or str(tiny_model_dir())
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CONES2_BACKEND")}
    torch_default = torch_default_threads(env)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    conditions = list(itertools.product([int(b) for b in args.burners.split(",")],
                                        [int(g) for g in args.generations.split(",")]))
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for busy, generations in conditions:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            with burners(busy):
                for round_ in range(args.repeats):
                    order = variants[round_ % len(variants):] + variants[: round_ % len(variants)]
                    for variant in order:
                        cmd, run_env = command_for(variant, generations, args, model, f"{tmp}/o.png", env,
                                                   torch_default)
                        start = time.perf_counter()
                        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                        wall = time.perf_counter() - start
                        if proc.returncode != 0:
                            print(proc.stderr[-3000:], file=sys.stderr)
                            return 1
                        sampling = TIMES.search(proc.stdout)
                        runs[variant].append({"round": round_, "process_s": round(wall, 3),
                                              "sampling_s": float(sampling.group(2)) if sampling else None,
                                              "loadavg_1m": round(os.getloadavg()[0], 2)})
                        print(f"burners={busy} images={generations} round {round_} {variant:18s} "
                              f"process {wall:7.2f} s  load {os.getloadavg()[0]:.2f}", flush=True)
            summary = {v: summarise(rs) for v, rs in runs.items()}
            fixed = [s["process_median_s"] for v, s in summary.items() if parse_variant(v)[1] not in ("rule", "omp1")]
            best_fixed = min(fixed or [s["process_median_s"] for s in summary.values()])   # else: the best variant
            for s in summary.values():
                s["vs_best_fixed"] = round(s["process_median_s"] / best_fixed, 3)
            results.append({"burners": busy, "generations": generations, "summary": summary, "runs": runs})
    settings = {"model": model, "steps": args.steps, "guidance_steps": args.steps, "resolution": args.resolution,
                "repeats": args.repeats, "variants": variants, "burners": args.burners,
                "generations": args.generations, "cpu_count": os.cpu_count(), "torch_default_threads": torch_default}
    payload = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "conditions": results}
    write_result(args.json, settings, payload, argv=argv, script="bench/threads.py",
                 files=["threads.md"] if Path(args.json).parent.joinpath("threads.md").exists() else None)
    print("\n| busy cores | images/process | variant | process median (min..max) s | / best fixed (or best) | load 1m |")
    print("|---|---|---|---|---|---|")
    for c in results:
        for v, s in c["summary"].items():
            print(f"| {c['burners']} | {c['generations']} | {v} | {s['process_median_s']:.2f} "
                  f"({s['process_min_s']:.2f}..{s['process_max_s']:.2f}) | {s['vs_best_fixed']:.2f} | "
                  f"{min(s['loadavg_1m']):.1f}-{max(s['loadavg_1m']):.1f} |")
    print(f"load average before {load_before}, after {payload['loadavg_after']}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
