"""`python -m cones2_train.demo_world.train`: train the demo model on the demo world (issue 7).

    python -m cones2_train.demo_world.train --out runs/demo              # all stages, then OUT/model
    python -m cones2_train.demo_world.train --out runs/demo --resume     # continue after Ctrl-C
    python -m cones2_train.demo_world.train --out runs/demo --stage unet --steps 10000 --resume  # extend
    python -m cones2_train.demo_world.train --out runs/demo --steps unet=9500 --cooldown 1500 --resume  # + decay

Stages run in order vae -> text -> unet; a finished stage (same recipe and step count) is skipped.
`OUT/model` is the diffusers directory `cones2.Engine.from_pretrained` loads. Exit codes: 0 done,
2 a user mistake (one line on stderr), 130 interrupted (a checkpoint was saved).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from cones2 import Cones2Error
from cones2.cli.exit_codes import run_cli
from cones2.cli.parser import ArgumentParser
from cones2.outputs import output_folder
from cones2.threads import configure_threads

from . import stages as S
from .models import weight_bytes
from .recipe import STAGES, Recipe, recipe_for


PROG = "python -m cones2_train.demo_world.train"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (checkpoints, stage artefacts, OUT/model)")
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--steps", action="append", default=[], metavar="N or STAGE=N",
                   help="step count of --stage (or STAGE=N for any stage; repeatable); default: the recipe's")
    p.add_argument("--cooldown", type=int, default=0, metavar="N",
                   help="the unet stage's learning rates fall linearly to 0 over its last N steps (default 0: "
                        "constant; a finished constant run can be extended with --steps unet=M --cooldown N --resume)")
    p.add_argument("--guided-tail", type=int, default=0, metavar="N",
                   help="over the unet stage's last N steps, train --guided-fraction of the samples at guided "
                        "timesteps under layout guidance with their own boxes (default 0: never)")
    p.add_argument("--guided-fraction", type=float, default=Recipe.guided_fraction, metavar="P",
                   help=f"share of samples at guided timesteps trained under guidance (default {Recipe.guided_fraction})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-from", metavar="MODEL_DIR",
                   help="take the vae stage from this demo model (same vae recipe and steps) instead of training it")
    p.add_argument("--world", choices=["v1", "v2"], default="v1",
                   help="v2: 40%% patterned objects, captions name both colours (issue 14); v1: the first demo model")
    p.add_argument("--latent", type=int, choices=[8, 16], default=8,
                   help="latent side for the 64 px world: 8 (4 VAE blocks, the shipped model) or 16 (3 blocks)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the measured rule of cones2.threads)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and on Ctrl-C)")
    p.add_argument("--smoke", action="store_true", help="the tiny test recipe (seconds; pictures are noise)")
    p.add_argument("--model-dir", help="where to write the diffusers directory (default OUT/model)")
    p.add_argument("--no-progress", action="store_true")
    return p


def recipe_from_args(args) -> Recipe:
    recipe = recipe_for(getattr(args, "world", "v1"), getattr(args, "latent", 8), args.seed, args.smoke)
    steps = {}
    for item in args.steps:
        stage, eq, value = item.rpartition("=")
        if not eq:
            if args.stage == "all":
                raise Cones2Error("a bare --steps N needs --stage; use STAGE=N with --stage all", "steps")
            stage = args.stage
        if stage not in STAGES:
            raise Cones2Error(f"unknown stage {stage!r} (choose {', '.join(STAGES)})", "steps")
        try:
            steps[stage] = int(value)
        except ValueError:
            raise Cones2Error(f"must be an integer, got {value!r}", "steps") from None
        if steps[stage] < 1:
            raise Cones2Error(f"must be >= 1, got {steps[stage]}", "steps")
    return replace(recipe.with_steps(**steps), unet_cooldown=args.cooldown,      # Recipe checks the ranges
                   unet_guided_tail=args.guided_tail, guided_fraction=args.guided_fraction)


def train(out: str | Path, recipe: Recipe, stage: str = "all", *, resume: bool = False, save_every: int = 200,
          progress: bool = True, model_dir: str | Path | None = None, should_stop=None) -> dict:
    """Run the stage(s) and, when every stage is done, write the model directory. Returns a summary
    {stage: artefact metadata, "model": path or None}. should_stop() is polled after every step;
    when it returns True the stage saves a checkpoint and raises `StageInterrupted` (as Ctrl-C does)."""
    run = S.Run(Path(out), recipe, progress=progress, resume=resume, save_every=save_every, should_stop=should_stop)
    run.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    table = None
    for name in (STAGES if stage == "all" else (stage,)):
        done = run.finished(name)
        if done is not None:
            summary[name] = done
            continue
        if name == "vae":
            summary[name] = S.train_vae(run)
        else:
            table = table if table is not None else S.captions(run)
            summary[name] = S.train_text(run, table) if name == "text" else S.train_unet(run, table)
    ready = all(run.finished(s) is not None for s in STAGES)
    summary["model"] = S.export(run, Path(model_dir) if model_dir else None) if ready else None
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a bare Ctrl-C comes outside a step loop (building the dataset caches); a stage's own interrupt
    # (StageInterrupted) carries its message: where the checkpoint went
    return run_cli(PROG, lambda: _run(args), interrupted="interrupted before a stage's steps began; nothing to "
                   "save (caches are written whole or not at all)")


def _run(args) -> int:
    configure_threads(args.threads)
    if args.save_every < 0:
        raise Cones2Error(f"must be >= 0, got {args.save_every}", "save-every")
    recipe = recipe_from_args(args)
    output_folder(args.out, "out")
    if args.model_dir:
        output_folder(args.model_dir, "model-dir", replaced=True)
    start = time.perf_counter()
    if getattr(args, "vae_from", None) and S.Run(Path(args.out), recipe).finished("vae") is None:
        S.import_vae(S.Run(Path(args.out), recipe), args.vae_from)
    summary = train(args.out, recipe, args.stage, resume=args.resume, save_every=args.save_every,
                    progress=not args.no_progress, model_dir=args.model_dir)
    for name in STAGES:
        if name in summary:
            m = summary[name]
            print(f"{name:5s} {m['steps']:6d} steps  {m['seconds']:8.1f} s in steps  {m['ms_per_step']:7.1f} ms/step  "
                  f"({m['threads']} threads)  {m['losses']}")
    if summary["model"] is not None:
        print(f"model: {summary['model']}  ({weight_bytes(summary['model']) / 2**20:.1f} MiB of safetensors)")
    print(f"wall time of this invocation: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
