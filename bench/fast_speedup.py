"""Whole-generation time of `fast` (its defaults) against `paper-exact` (its defaults) on one model,
one thread, alternated in one process (issue 24's CPU target: fast at least 6x faster).

    python bench/fast_speedup.py --model engine/cones2/data/demo_model --rounds 3 --json OUT

Backend `sdpa` (the PyTorch UNet: fast mode's work reuse needs its modules). Records `uptime`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BOXES = {"circle": (0.05, 0.05, 0.45, 0.45), "star": (0.55, 0.05, 0.95, 0.45), "square": (0.3, 0.55, 0.7, 0.95)}
PROMPT = "a red circle, a blue star and a green square on a sand background"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="engine/cones2/data/demo_model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import cones2
    from cones2.threads import configure_threads

    configure_threads(1)
    engine = cones2.Engine.from_pretrained(args.model, backend="sdpa")
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
    result = {"model": args.model, "backend": "sdpa", "threads": 1, "seconds": times, "median": med,
              "speedup_of_medians": med["paper-exact"] / med["fast"], "uptime_before_after": load}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
