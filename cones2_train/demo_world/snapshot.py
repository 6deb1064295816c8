"""`python -m cones2_train.demo_world.snapshot`: a model directory from a demo-model run that is still
training (the unet stage's latest checkpoint, EMA weights), to measure it with bench/quality.py.

    python -m cones2_train.demo_world.snapshot --out runs/demo2 --world v2 --model-dir runs/demo2/snapshot
    python -m cones2_train.demo_world.snapshot --out runs/demo3 --world v2 --latent 16 --model-dir runs/demo3/snapshot

The run's recipe must be given as it was to `train` (--world, --latent, --seed; step counts do not matter),
since the checkpoint is only read under the recipe fingerprint it was made with. Reading a
checkpoint while the run writes the next one is safe: checkpoints are replaced atomically.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cones2.cli.exit_codes import run_cli
from cones2.cli.parser import ArgumentParser

from . import stages as S
from .recipe import recipe_for

PROG = "python -m cones2_train.demo_world.snapshot"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--out", required=True, help="the training run's folder")
    p.add_argument("--model-dir", required=True, help="where to write the snapshot model")
    p.add_argument("--world", choices=["v1", "v2"], default="v1")
    p.add_argument("--latent", type=int, choices=[8, 16], default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the run used the smoke recipe")
    args = p.parse_args(argv)

    def run() -> int:
        recipe = recipe_for(args.world, args.latent, args.seed, args.smoke)
        run_ = S.Run(Path(args.out), recipe, progress=False)
        for stage in ("vae", "text"):            # the finished stages fix their own step counts
            meta = S.read_meta(run_.artefact(stage))
            if meta:
                run_.recipe = recipe = recipe.with_steps(**{stage: meta["steps"]})
        path = S.export_snapshot(run_, Path(args.model_dir))
        step = S.load_state(run_.checkpoint("unet"), "unet", recipe.fingerprint("unet"))["step"]
        print(f"snapshot of unet step {step}: {path}")
        return 0

    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
