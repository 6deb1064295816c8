"""Training speed of `cones2_train` on this device: steps/s, peak memory, where a step's time goes.

    python bench/train_speed.py                         # embedded tiny model, CPU, 20 steps at 128 px
    python bench/train_speed.py --model /models/sd21 --device cuda --resolution 768 --steps 50
    python bench/train_speed.py --shape sd21 --resolution 256 --steps 3 --warmup 1   # random full-size SD 2.1
    python bench/train_speed.py --steps 20 --json bench/results/train_speed.json     # also write the numbers

Two runs on the same synthetic images: a timed run (no per-phase syncs; steps/s over the steps after
`--warmup`) and a profiled run (syncs at phase edges) that splits the step into data, text-encoder
forward/backward, UNet forward/backward and optimizer. The VAE cache and the residual extraction
are one-off costs, reported apart. `--shape sd21` builds randomly initialised SD 2.1 components from
bench/configs/sd21 in memory (real shapes, no weights needed; ~10 GB of host memory in fp32).
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import torch

from harness.results import write_result
from PIL import Image, ImageDraw

from harness.random_model import random_components
from cones2_train import TrainConfig, Trainer
from cones2_train.profiling import format_profile


def synthetic_images(n: int = 4) -> list[Image.Image]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (640 + 64 * i, 512), (25 * i, 120, 190))
        ImageDraw.Draw(im).ellipse((80 + 20 * i, 60, 420, 460), fill=(215, 90, 40))
        out.append(im)
    return out


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{rss_kib / 2**20:.2f} GiB (peak RSS of the whole process)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers SD dir (default: the embedded tiny model)")
    p.add_argument("--shape", choices=["tiny", "sd21"], default="tiny",
                   help="sd21: random full-size SD 2.1 components instead of --model")
    p.add_argument("--configs", default=str(Path(__file__).resolve().parent / "configs" / "sd21"),
                   help="SD 2.1 config folder for --shape sd21 (default: bench/configs/sd21)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of steps/s")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-profile", action="store_true", help="only the timed run")
    p.add_argument("--compare-optimizers", action="store_true",
                   help="also time AdamW implementations over E' (for-loop / foreach / fused)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the rule of cones2.threads)")
    args = p.parse_args(argv)
    from cones2.threads import configure_threads

    configure_threads(args.threads)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")

    cfg = TrainConfig(steps=args.steps, resolution=args.resolution, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = args.model
    if args.shape == "sd21":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype or "", torch.float32)
        if args.dtype is None and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        t0 = time.perf_counter()
        model = random_components(args.configs, device, torch.float32, unet_dtype=dtype)
        print(f"built random SD 2.1 components in {time.perf_counter() - t0:.1f}s")
    images = synthetic_images()

    # ---- timed run ---------------------------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = Trainer(model, images, "dog", cfg)
    setup = time.perf_counter() - t0
    model = trainer.components            # reuse the loaded model for the profiled run
    stamps: dict[int, float] = {}

    def on_step(step, total, loss):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps[step] = time.perf_counter()

    trainer.train(progress=False, on_step=on_step)      # ends with the residual extraction
    extract = time.perf_counter() - stamps[args.steps]
    measured = args.steps - args.warmup
    per_step = (stamps[args.steps] - stamps[args.warmup]) / measured
    memory = peak_memory(device)

    print(f"device {device} ({torch.get_num_threads()} threads), model {trainer.components.model_id}, "
          f"{args.resolution}px, batch {args.batch_size}, autocast {trainer.dtype}, UNet {trainer.unet.dtype}")
    print(f"steps/s            {1 / per_step:.2f}  ({1e3 * per_step:.1f} ms/step over {measured} steps after "
          f"{args.warmup} warm-up)")
    print(f"4000 steps would take {4000 * per_step / 60:.1f} min at this speed")
    print(f"setup (load + VAE cache + checks) {setup:.2f}s; residual extraction over "
          f"{len(trainer.captions)} captions {extract:.2f}s")
    print(f"peak memory        {memory}")
    record = {"command": " ".join(["python bench/train_speed.py"] + sys.argv[1:]), "device": str(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model_id": trainer.components.model_id, "resolution": args.resolution, "batch_size": args.batch_size,
              "dtype": str(trainer.dtype), "steps": args.steps, "warmup": args.warmup,
              "steps_per_s": 1 / per_step, "ms_per_step": 1e3 * per_step, "setup_s": setup,
              "residual_extraction_s": extract, "captions": len(trainer.captions), "peak_memory": memory}
    del trainer                           # free E' and its optimizer state before the second run
    gc.collect()

    # ---- profiled run ------------------------------------------------------------------------------
    if not args.skip_profile:
        profiled = Trainer(model, images, "dog", cfg, profile=True)
        profiled.train(progress=False)
        sec = profiled.timer.seconds
        print("\nper-phase time (profiled run, synchronised at phase edges):")
        print(format_profile(sec, args.steps))
        record["profile_ms_per_step"] = {k: 1e3 * v / args.steps for k, v in sec.items()
                                         if k not in ("vae_cache", "residual_extraction")}
        record["profile_one_off_ms"] = {k: 1e3 * v for k, v in sec.items() if k in ("vae_cache", "residual_extraction")}
        vae_per_step = sec["vae_cache"] / profiled.num_images * args.batch_size
        step_s = sum(v for k, v in sec.items() if k not in ("vae_cache", "residual_extraction")) / args.steps
        print(f"latent cache: encoding the batch with the VAE every step would add {1e3 * vae_per_step:.1f} ms/step "
              f"(x{(step_s + vae_per_step) / step_s:.2f} step time)")
        if args.compare_optimizers:
            record["adamw_ms"] = compare_optimizers(list(profiled.tuned.parameters()), device)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        write_result(args.json, settings, record, script="bench/train_speed.py")
        print(f"wrote {args.json}")
    return 0


def compare_optimizers(params: list[torch.Tensor], device: torch.device, steps: int = 5) -> dict[str, float]:
    """AdamW step time over E'-shaped parameters: per-tensor loop vs foreach vs fused, in one run."""
    times = {}
    for name, kw in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=5e-6, weight_decay=1e-2, **kw)
        opt.step()                                              # creates the state
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[name] = (time.perf_counter() - t0) / steps
        del opt, ps
        gc.collect()
    n = sum(p.numel() for p in params)
    print(f"AdamW over E' ({n / 1e6:.1f}M params): " + ", ".join(
        f"{k} {1e3 * v:.1f} ms (x{times['for-loop'] / v:.1f})" for k, v in times.items()))
    return {k: 1e3 * v for k, v in times.items()}


if __name__ == "__main__":
    sys.exit(main())
