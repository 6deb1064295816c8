"""`cones2-train`: a folder of images + a word -> a residual file the engine loads (SPEC section 1).

User mistakes (bad flags, unwritable outputs) print one line and exit 2 before any work; Ctrl-C
saves a resumable checkpoint and exits 130 (`cones2.cli.exit_codes`, shared with `cones2-engine`).
"""
from __future__ import annotations

import argparse
import sys
import time

from cones2.cli.exit_codes import run_cli
from cones2.cli.parser import ArgumentParser
from cones2.outputs import output_file, output_folder
from cones2.threads import configure_threads

from .config import TrainConfig

PROG = "cones2-train"

# Recipes for --steps, --lr and --train-prompt (docs/training.md). `sd` is SPEC 1's reference recipe;
# `demo` is what moves a word on the small embedded demo model (the shipped residuals were made so).
PRESETS = {"sd": {"steps": 4000, "lr": 5e-6, "train_prompt": "{}"},
           "demo": {"steps": 600, "lr": 3e-4, "train_prompt": "a {}"}}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None / False ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Learn a Cones 2 subject residual from a few images.",
                                formatter_class=_DefaultsFormatter)
    p.add_argument("--model", help="diffusers-layout SD checkpoint dir or hub id (default: the embedded model)")
    p.add_argument("--images", required=True, help="folder of .jpg/.jpeg/.png/.webp images of the subject")
    p.add_argument("--word", required=True, help="the subject's base word, e.g. dog (may be several tokens)")
    p.add_argument("--out", required=True, help="residual file to write (.safetensors)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe for --steps, --lr and --train-prompt: sd (SPEC 1: 4000 steps, lr 5e-6, the bare "
                        "word) or demo (600 steps, lr 3e-4, 'a {}'); default: demo on the embedded demo model, "
                        "sd otherwise; explicit flags override it")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant (default: the preset's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square training size in px (default: the model's own, 768 for SD 2.1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per step")
    p.add_argument("--reg-first", type=float, default=1e-2, help="regulariser weight a (start token)")
    p.add_argument("--reg-rest", type=float, default=1e-3, help="regulariser weight b (end token and padding)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seeds image order, latent samples, noise, timesteps")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the measured rule of cones2.threads)")
    p.add_argument("--templates", default=None, help="caption templates file, one caption with one {} per line")
    p.add_argument("--train-prompt", default=None,
                   help="caption the denoising loss conditions on, one {} for the word (default: the preset's; "
                        "sd: {}, the bare word of SPEC 1.2; demo: 'a {}', docs/training.md)")
    p.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps (0: only on Ctrl-C)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT without suffix + .ckpt)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="periodic checkpoints to keep")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint (a step folder, or the checkpoint folder: its newest)")
    p.add_argument("--save-encoder", default=None, metavar="DIR", help="also save the tuned text encoder here")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less UNet memory, slower steps")
    p.add_argument("--profile", action="store_true", help="print where the step time goes (syncs; slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: run(args))


def on_demo_model(model: str | None) -> bool:
    """Whether `model` (None: the default) is the embedded demo model shipped in the package."""
    from pathlib import Path

    from cones2.default_model import default_model_dir, shipped_demo_model

    shipped = shipped_demo_model()
    path = default_model_dir() if model is None else Path(model)
    return shipped is not None and path.exists() and path.resolve() == shipped.resolve()


def apply_preset(args) -> str:
    """Fill --steps, --lr and --train-prompt left unset from the preset (chosen or defaulted); returns
    its name. On the demo model the SD recipe barely moves a word: the demo preset is the default there."""
    name = args.preset or ("demo" if on_demo_model(args.model) else "sd")
    for key, value in PRESETS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return name


def run(args) -> int:
    out = output_file(args.out, "out", (".safetensors",))
    checkpoint_dir = output_folder(args.checkpoint_dir or str(out.with_suffix("")) + ".ckpt", "checkpoint_dir")
    if args.save_encoder:
        output_folder(args.save_encoder, "save_encoder")
    preset = apply_preset(args)
    if args.preset is None and preset == "demo":
        print(f"training on the embedded demo model: the demo preset (--steps {args.steps} --lr {args.lr:g} "
              f"--train-prompt {args.train_prompt!r} unless given; --preset sd for SPEC 1's recipe; docs/training.md)",
              flush=True)
    configure_threads(args.threads)
    config = TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, resolution=args.resolution,
        reg_first=args.reg_first, reg_rest=args.reg_rest, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
        seed=args.seed, device=args.device, dtype=args.dtype, templates=args.templates,
        train_prompt=args.train_prompt, save_every=args.save_every,
        checkpoint_dir=str(checkpoint_dir),
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, gradient_checkpointing=args.gradient_checkpointing)

    from .trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(args.model, args.images, args.word, config, profile=args.profile)
    first_step = trainer.step
    residual = trainer.train(progress=not args.no_progress)
    residual.save(out)
    written = [str(out)]
    if args.save_encoder:
        trainer.save_encoder(args.save_encoder)
        written.append(args.save_encoder)
    elapsed = time.perf_counter() - start
    loss = f", last loss {trainer.last_loss:.4g}" if trainer.last_loss is not None else ""
    print(f"wrote {', '.join(written)}  (word {residual.word!r}: {residual.rows} token(s) x D={residual.dim}; "
          f"{trainer.step} steps at {trainer.resolution}px on {trainer.device}, {elapsed:.1f}s{loss})")
    if args.profile:
        from .profiling import format_profile

        print(format_profile(trainer.timer.seconds, trainer.step - first_step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
