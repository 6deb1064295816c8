"""Whole-generation time of `fast` (its defaults) against `paper-exact` (its defaults) on one model,
one thread, alternated in one process (issue 24's CPU target: fast at least 6x faster).

    python bench/fast_speedup.py --model engine/cones2/data/demo_model --rounds 3 --json OUT
    python bench/fast_speedup.py --backend onnxruntime --rounds 3 --json OUT

Backend `sdpa` by default (the eager PyTorch UNet); with a compiled or exported runner, fast's plain
passes run there and the ones that reuse work on the eager UNet (docs/speed.md). Writes a results
record with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from harness.results import write_result

BOXES = {"circle": (0.05, 0.05, 0.45, 0.45), "star": (0.55, 0.05, 0.95, 0.45), "square": (0.3, 0.55, 0.7, 0.95)}
PROMPT = "a red circle, a blue star and a green square on a sand background"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="engine/cones2/data/demo_model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import cones2
    from cones2.threads import configure_threads

    configure_threads(1)
    engine = cones2.Engine.from_pretrained(args.model, backend=args.backend)
    layout = cones2.Layout.from_boxes(BOXES)
    times = {"paper-exact": [], "fast": []}
    load = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    for mode in times:                                    # warm-up, not timed
        engine.generate(PROMPT, None, layout, seed=0, mode=mode, progress=False)
    for r in range(args.rounds):
        for mode in (list(times) if r % 2 == 0 else list(times)[::-1]):
            start = time.perf_counter()
            engine.generate(PROMPT, None, layout, seed=r + 1, mode=mode, progress=False)
            times[mode].append(time.perf_counter() - start)
    load.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    result = {"model": args.model, "backend": args.backend, "threads": 1, "seconds": times, "median": med,
              "speedup_of_medians": med["paper-exact"] / med["fast"], "uptime_before_after": load}
    print(json.dumps(result, indent=1))
    if args.json:
        headline = (f"fast (defaults) vs paper-exact (defaults), whole generation, demo model, 1 thread, "
                    f"{args.backend}: {med['fast']:.2f} s vs {med['paper-exact']:.2f} s, "
                    f"{result['speedup_of_medians']:.2f}x (medians of {args.rounds}; load {load[0].split('average:')[-1].strip()})")
        write_result(args.json, vars(args), result, argv=argv, script="bench/fast_speedup.py",
                     summaries=[{"area": "fast mode CPU speed-up", "headline": headline, "details": "../../docs/speed.md"}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
