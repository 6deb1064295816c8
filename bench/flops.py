"""Work per image as a number (issue 24): UNet, text-encoder and VAE FLOPs of one whole generation
for each mode and setting, counted with `torch.utils.flop_counter.FlopCounterMode` on the meta
device (no weights, no arithmetic: full-size shapes run in seconds on any machine).

The UNet count runs the engine's own sampling loop (`cones2.sampler.sample`, with the `StepPlan`
the engine would build from a `SamplingConfig`) on meta tensors, so every pass the loop makes is
counted as the code makes it. One "UNet call" is one CFG-pair forward: batch 2, unguided, full.

    python bench/flops.py --json bench/results/flops.json
    python bench/flops.py --shapes sd21 --subjects 2 --setting fast:steps=12,guidance_steps=4,gate_step=8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from harness.results import write_result
from torch.utils.flop_counter import FlopCounterMode

from cones2.attention import Cones2AttnProcessor
from cones2.config import SamplingConfig
from harness.random_model import random_components
from cones2.reuse import StepPlan
from cones2.runners import TorchUNetRunner
from cones2.sampler import BatchInputs, NoiseStream, sample
from cones2.schedule import guidance_log_terms, make_schedule

CONFIGS = Path(__file__).parent / "configs"
SHAPES = {"sd15": (CONFIGS / "sd15", 512), "sd21": (CONFIGS / "sd21", 768)}
SEQ_LEN = 77
# (label, SamplingConfig fields): each mode at its defaults, the settings issue 24 names, the knobs one at a time
SETTINGS = [
    ("paper-exact", dict(mode="paper-exact")),
    ("paper-exact 30 steps, 15 guided (bench/quality.py)", dict(mode="paper-exact", steps=30, guidance_steps=15)),
    ("fast before issue 24 (20 steps, 12 guided, no reuse)",
     dict(mode="fast", steps=20, guidance_steps=12, gate_step=20, cache_interval=1)),
    ("fast (defaults)", dict(mode="fast")),
]


def parse_setting(text: str) -> tuple[str, dict]:
    """"mode:key=value,..." -> (text, SamplingConfig fields)."""
    mode, _, rest = text.partition(":")
    fields = dict(mode=mode)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        fields[key.strip()] = int(value)
    return text, fields


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class Model:
    """Meta-device components of one shape with the engine's attention processor (`sdpa` backend)."""

    def __init__(self, config_dir: Path, side: int):
        self.c = random_components(config_dir, device="meta")
        self.c.unet.set_attn_processor(Cones2AttnProcessor())
        self.runner = TorchUNetRunner(self.c.unet, "sdpa")
        self.side = side
        vae_scale = 2 ** (len(self.c.vae.config.block_out_channels) - 1)
        self.latent = side // vae_scale
        self.width = self.c.text_encoder.config.hidden_size
        self.prediction = self.c.scheduler_config.get("prediction_type", "epsilon")

    def levels(self) -> list[int]:
        return [(self.latent >> k) ** 2 for k in range(len(self.c.unet.config.block_out_channels))]

    def inputs(self, subjects: int) -> BatchInputs:
        meta = dict(device="meta")
        weights = {n: torch.empty(1, n, SEQ_LEN, **meta) for n in self.levels()} if subjects else None
        shape = (1, self.c.unet.config.in_channels, self.latent, self.latent)
        return BatchInputs(torch.empty(1, SEQ_LEN, self.width, **meta), torch.empty(1, SEQ_LEN, self.width, **meta),
                           weights, torch.full((1,), 0.08, **meta), torch.full((1,), 7.5, **meta),
                           [NoiseStream(0, shape, torch.device("meta"), True)])

    def call_flops(self) -> int:
        """One CFG-pair UNet forward: batch 2, unguided, every block."""
        x = torch.empty(2, self.c.unet.config.in_channels, self.latent, self.latent, device="meta")
        emb = torch.empty(2, SEQ_LEN, self.width, device="meta")
        return flops(lambda: self.runner(x, torch.tensor(500.0, device="meta"), emb, None))

    def text_flops(self) -> int:
        """E(prompt) and E(""): one text-encoder call of batch 2 (as the engine encodes them)."""
        ids = torch.zeros(2, SEQ_LEN, dtype=torch.long, device="meta")
        return flops(lambda: self.c.text_encoder(ids))

    def vae_flops(self) -> int:
        z = torch.empty(1, self.c.vae.config.latent_channels, self.latent, self.latent, device="meta")
        return flops(lambda: self.c.vae.decode(z))

    def generation_unet_flops(self, config: SamplingConfig, subjects: int) -> int:
        """The sampling loop of `config`, as the engine runs it, on meta tensors."""
        sched = self.c.scheduler_config
        schedule = make_schedule(config.mode, config.steps, sched["beta_start"], sched["beta_end"],
                                 sched["beta_schedule"], sched["num_train_timesteps"])
        plan = StepPlan.make(config.steps, config.guidance_steps, config.gate_step, config.cache_interval)
        inputs = self.inputs(subjects)
        return flops(lambda: sample(self.runner, inputs, schedule, guidance_log_terms(config.guidance_steps),
                                    self.prediction, plan=plan, progress=False))


def measure(shapes: list[str], subjects: list[int], settings: list[tuple[str, dict]]) -> dict:
    out = {}
    for name in shapes:
        config_dir, side = SHAPES[name]
        model = Model(config_dir, side)
        call, text, vae = model.call_flops(), model.text_flops(), model.vae_flops()
        rows = []
        for label, fields in settings:
            config = SamplingConfig(height=side, width=side, **fields)
            for n in subjects:
                unet = model.generation_unet_flops(config, n)
                plan = StepPlan.make(config.steps, config.guidance_steps, config.gate_step, config.cache_interval)
                rows.append({"setting": label, "subjects": n, "steps": config.steps,
                             "guidance_steps": config.guidance_steps, "gate_step": config.gate_step,
                             "cache_interval": config.cache_interval, "unet_passes": len(plan.unet_passes()),
                             "unet_tflop": unet / 1e12, "unet_calls": unet / call,
                             "total_calls": (unet + text + vae) / call})
        out[name] = {"side": side, "call_tflop": call / 1e12, "text_encoder_tflop": text / 1e12,
                     "vae_decode_tflop": vae / 1e12, "rows": rows}
    return out


def table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines += [f"{name}, {r['side']} px: one UNet call (CFG pair) {r['call_tflop']:.2f} TFLOP, text encoder "
                  f"(batch 2) {r['text_encoder_tflop']:.3f}, VAE decode {r['vae_decode_tflop']:.2f}",
                  "| setting | subjects | N | G | gate | interval | UNet passes | UNet calls | with text + VAE |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {x['setting']} | {x['subjects']} | {x['steps']} | {x['guidance_steps']} | {x['gate_step']} | "
                  f"{x['cache_interval']} | {x['unet_passes']} | {x['unet_calls']:.2f} | {x['total_calls']:.2f} |"
                  for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="sd15,sd21", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--subjects", default="1,2,3,4", help="subject counts (each with a layout; 0 = no layout)")
    p.add_argument("--setting", action="append", default=[],
                   help="extra setting, mode:field=value,... (SamplingConfig fields), repeatable")
    p.add_argument("--only", action="store_true", help="only the --setting rows (not the standard ones)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--files", nargs="+", default=[], metavar="NAME",
                   help="other files of this run (its log, uptime), relative to the record's folder; "
                        "the record lists them")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}")
    settings = ([] if args.only else SETTINGS) + [parse_setting(s) for s in args.setting]
    results = measure(shapes, [int(n) for n in args.subjects.split(",")], settings)
    print(table(results))
    if args.json:
        write_result(args.json, {k: v for k, v in vars(args).items() if k not in ("json", "files")}, results,
                     argv=argv, script="bench/flops.py", summaries=[headline(results)], files=args.files)
    return 0


def headline(results: dict) -> dict:
    """The RESULTS.md row: UNet-call equivalents of the standard settings at each shape."""
    def at(label):
        found = [next((r["unet_calls"] for r in shape["rows"] if r["setting"] == label), None)
                 for shape in results.values()]
        return " / ".join(f"{v:.2f}" for v in found if v is not None)

    calls = " / ".join(f"{s['call_tflop']:.2f} TFLOP {name} {s['side']} px" for name, s in results.items())
    labels = [label for label, _ in SETTINGS if label != SETTINGS[1][0]]
    return {"area": "work per image (FLOPs, meta device)",
            "headline": f"UNet-call equivalents per image (one call = a CFG-pair UNet forward: {calls}): "
                        + "; ".join(f"{label} {at(label)}" for label in labels if at(label)),
            "details": "../../docs/speed.md"}


if __name__ == "__main__":
    sys.exit(main())
