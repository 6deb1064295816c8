"""How many torch CPU threads make `cones2-engine generate` fastest here: whole processes, alternated.

    python bench/threads.py                                   # 1, 2 and torch's default, 4 rounds, 30 steps
    python bench/threads.py --variants 1,2,4,torch,rule --repeats 6 --json bench/results/threads.json

Each round runs one `cones2-engine generate` process per variant (the order rotates every round, so
a change in the machine's load hits every variant alike) on the tiny random SD model (128 px, three
cross-attention levels), and records the process's wall time and the sampling time it prints.
Variants: a number (`--threads N`), `torch` (`--threads` = torch's own default count on this
machine, read in a fresh process without OMP_NUM_THREADS), `rule` (no `--threads`: the default rule
of `cones2.threads`), `omp1` (no `--threads`, OMP_NUM_THREADS=1 in the environment).
The JSON keeps every run, the load average before and after, and the machine's core counts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMES = re.compile(r"\(([\d.]+)s: sampling ([\d.]+)s, decode ([\d.]+)s\)")


def torch_default_threads(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def command_for(variant: str, base: list[str], env: dict, torch_default: int) -> tuple[list[str], dict]:
    if variant == "torch":
        return [*base, "--threads", str(torch_default)], env
    if variant == "rule":
        return base, env
    if variant == "omp1":
        return base, env | {"OMP_NUM_THREADS": "1"}
    return [*base, "--threads", str(int(variant))], env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers directory (default: the tiny random model, built in the cache)")
    p.add_argument("--variants", default="1,2,torch", help="comma-separated: N, torch, rule, omp1")
    p.add_argument("--repeats", type=int, default=4, help="rounds (each runs every variant once)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--json", default="bench/results/threads.json", help="write every run here")
    args = p.parse_args(argv)

    from cones2.default_model import tiny_model_dir

    model = args.model or str(tiny_model_dir())
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    torch_default = torch_default_threads(env)
    exe = str(Path(sys.executable).parent / "cones2-engine")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = [exe, "generate", "--model", model, "--prompt", "a dog and a mug on the beach",
                "--box", "dog=0,0.3,0.5,1", "--box", "mug=0.5,0.4,1,1", "--steps", str(args.steps),
                "--resolution", str(args.resolution), "--seed", "0", "--out", f"{tmp}/o.png", "--no-progress"]
        for round_ in range(args.repeats):
            order = variants[round_ % len(variants):] + variants[: round_ % len(variants)]
            for variant in order:
                cmd, run_env = command_for(variant, base, env, torch_default)
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                total, sampling, decode = (float(x) for x in TIMES.search(proc.stdout).groups())
                runs[variant].append({"round": round_, "process_s": round(wall, 3), "generate_s": total,
                                      "sampling_s": sampling, "loadavg_1m": os.getloadavg()[0]})
                print(f"round {round_} threads={variant:6s} process {wall:6.2f} s  sampling {sampling:6.2f} s",
                      flush=True)
    summary = {}
    for variant, rs in runs.items():
        proc_s = [r["process_s"] for r in rs]
        samp_s = [r["sampling_s"] for r in rs]
        summary[variant] = {"process_median_s": statistics.median(proc_s), "process_min_s": min(proc_s),
                            "process_max_s": max(proc_s), "sampling_median_s": statistics.median(samp_s),
                            "sampling_min_s": min(samp_s), "sampling_max_s": max(samp_s)}
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "model": model, "steps": args.steps, "resolution": args.resolution, "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "torch_default_threads": torch_default,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "summary": summary, "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| threads | process median (min..max) s | sampling median (min..max) s |\n|---|---|---|")
    for variant, s in summary.items():
        label = f"torch default ({torch_default})" if variant == "torch" else variant
        print(f"| {label} | {s['process_median_s']:.2f} ({s['process_min_s']:.2f}..{s['process_max_s']:.2f}) | "
              f"{s['sampling_median_s']:.2f} ({s['sampling_min_s']:.2f}..{s['sampling_max_s']:.2f}) |")
    print(f"load average before {load_before}, after {result['loadavg_after']}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
