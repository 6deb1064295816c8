#!/usr/bin/env python
"""Quality of the demo model: the command line of `cones2_train.demo_world.evaluation`, which
holds the evaluation itself (what layout guidance and residuals do, scored with the world's exact
detector). Prints tables; `--json` writes a results record (bench/harness/results.py).

    python bench/quality.py --model runs/demo/model --json bench/results/quality.json
    python bench/quality.py --quick --model DIR      # a small smoke subset
    python bench/quality.py --oracle --quick         # score the world's own renders: checks the metrics
    python bench/quality.py --no-layout --instances twotone_triangle,twotone_heart --residual-prompts 20
    python bench/quality.py --model DIR --no-residuals --layout-resize cell-centres --margin 8
    python bench/quality.py --model DIR --no-residuals --first-prompt 100 --prompts 200   # prompts not tuned on
    python bench/quality.py --model DIR --no-residuals --negative-weight -20 --save-misses out/misses
    python bench/quality.py --model DIR --no-residuals --mode fast --steps 10 --gate-step 5 --cache-interval 2
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from harness.results import write_result

from cones2.config import SamplingConfig
from cones2.limits import LAYOUT_RESIZES
from cones2.modes import describe as describe_modes, mode_names
from cones2_train.demo_world.evaluation import PAPER_EXACT_STEPS, Settings, evaluate, format_tables
from cones2_train.demo_world.metrics import LAYOUT_MARGIN
from cones2_train.demo_world.world import INSTANCES


def parse_args(argv) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers directory of the demo model (default: the embedded default)")
    p.add_argument("--counts", default="1,2,3,4", help="subject counts to evaluate")
    p.add_argument("--prompts", type=int, default=100, help="prompts per subject count")
    p.add_argument("--first-prompt", type=int, default=0,
                   help="index of the first evaluation prompt (e.g. 100: prompts no earlier run looked at)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: {PAPER_EXACT_STEPS} in paper-exact mode, the mode's own default "
                        "in the others)")
    p.add_argument("--mode", choices=mode_names(), default="paper-exact", help=describe_modes().replace("%", "%%"))
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=16, help="requests per sampling loop")
    p.add_argument("--residual-steps", type=int, default=300)
    p.add_argument("--residual-lr", type=float, default=3e-4)
    p.add_argument("--residual-prompts", type=int, default=40, help="generations per residual setting")
    p.add_argument("--first-residual-prompt", type=int, default=0,
                   help="seed of the first residual generation (e.g. 200: seeds no earlier run looked at)")
    p.add_argument("--residual-train-prompt", default="{}",
                   help="TrainConfig.train_prompt of the residuals (default {}: SPEC 1.2's bare word)")
    p.add_argument("--no-residuals", action="store_true")
    p.add_argument("--no-layout", action="store_true", help="skip the layout evaluation (residuals only)")
    p.add_argument("--instances", default=",".join(INSTANCES),
                   help="comma-separated subject instances (default: all of world.INSTANCES)")
    p.add_argument("--residual-dir", help="also save the trained residuals here")
    p.add_argument("--residuals-from", help="load <instance>.safetensors from here instead of training")
    p.add_argument("--named", action="store_true",
                   help="also score prompts that spell each instance out (\"a two-tone blue and yellow circle\")")
    p.add_argument("--guidance-steps", type=int, default=None, help="guided sampling steps (default: all)")
    p.add_argument("--gate-step", type=int, default=None,
                   help="fast mode: first step of the conditional-only tail with cached cross-attention "
                        "(SamplingConfig.gate_step; default: the mode's)")
    p.add_argument("--cache-interval", type=int, default=None,
                   help="fast mode: a full UNet pass every this many unguided steps, shallow ones between "
                        "(SamplingConfig.cache_interval; default: the mode's)")
    p.add_argument("--strength", type=float, default=2.5, help="layout strength w+ of every subject")
    p.add_argument("--negative-weight", type=float, default=SamplingConfig.negative_weight,
                   help="w- outside each subject's box (SamplingConfig.negative_weight; default SPEC 3's hard "
                        "mask, -1e8; a finite w- such as -10 is a soft mask)")
    p.add_argument("--layout-resize", choices=LAYOUT_RESIZES, default=LAYOUT_RESIZES[0],
                   help="how layouts reach the attention levels (SamplingConfig.layout_resize; default SPEC 3's)")
    p.add_argument("--margin", type=int, default=LAYOUT_MARGIN,
                   help=f"pixels added around each ground-truth box to make the layout box (default {LAYOUT_MARGIN})")
    p.add_argument("--quick", action="store_true",
                   help="small subset: counts 2,3; 3 prompts; 4 steps; 3 residual steps")
    p.add_argument("--oracle", action="store_true", help="score renders of the prompts' own scenes (no model)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the rule of cones2.threads)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--save-misses", metavar="DIR",
                   help="write unguided | guided (layout drawn) for each prompt where guidance lost an object")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    known = {f.name for f in fields(Settings)}
    values = {k: v for k, v in vars(args).items() if k in known}
    values["counts"] = [] if args.no_layout else [int(c) for c in args.counts.split(",")]
    values["instances"] = [n.strip() for n in args.instances.split(",") if n.strip()]
    values["progress"] = not args.no_progress
    try:
        settings = Settings(**values)
    except ValueError as exc:
        p.error(str(exc))
    return args, settings.quick() if args.quick else settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    import torch

    from cones2.threads import configure_threads

    configure_threads(args.threads)          # None: the measured default (bench/results/threads.md)
    results = evaluate(settings)
    print(format_tables(results))
    print(f"({results['seconds']} s; {settings.steps} sampling steps, cfg {settings.cfg}, "
          f"threads {torch.get_num_threads()})")
    if args.json:
        write_result(args.json, asdict(settings), results, argv=argv, script="bench/quality.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
