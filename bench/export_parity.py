"""Torch (`sdpa`) vs `onnxruntime` backend: latency and parity of a layout-guided generation,
measured in one run on this machine (runs alternate between the backends to share the noise).

    .venv/bin/python bench/export_parity.py --onnx out/onnx [--size 128 --steps 8 --repeats 5] [--json out.json]

Without --onnx the embedded model is exported to a temporary directory first (not timed).
Prints a markdown table: median wall seconds of the sampling loop and of one UNet call (batch 2,
guided), the torch/onnxruntime ratio, and the max abs difference of the final latents. `--json FILE`
also writes them, every timed sample and the export's own parity check (its manifest's `verified`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.results import machine, write_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", help="export directory (default: export the embedded model to a temp dir)")
    p.add_argument("--model", help="checkpoint the export came from (default: the embedded model)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--unet-calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: each library's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)

    import cones2
    from cones2.attention import Rectification

    if args.threads:
        torch.set_num_threads(args.threads)
    onnx_dir = args.onnx
    if onnx_dir is None:
        from cones2.export.onnx_export import export_onnx

        onnx_dir = tempfile.mkdtemp(prefix="cones2-bench-onnx-") + "/onnx"
        export_onnx(args.model, onnx_dir, progress=False)
    ort_options = {"onnx_dir": onnx_dir, "threads": args.threads}
    engines = {
        "torch (sdpa)": cones2.Engine.from_pretrained(args.model, backend="sdpa"),
        "onnxruntime": cones2.Engine.from_pretrained(args.model, backend="onnxruntime", backend_options=ort_options),
    }

    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.35, 0.5, 0.95), "mug": (0.55, 0.45, 0.95, 0.95)})
    kw = dict(layout=layout, steps=args.steps, seed=0, height=args.size, width=args.size, progress=False)
    sampling = {name: [] for name in engines}
    results = {}
    for rep in range(args.repeats + 1):          # first round is warm-up
        for name, engine in engines.items():
            result = engine.generate("a dog and a mug on the beach", **kw)
            if rep:
                sampling[name].append(result.timings["sampling"])
            results[name] = result

    unet = {name: [] for name in engines}
    e0 = engines["torch (sdpa)"]
    h, w = args.size // e0.vae_scale, args.size // e0.vae_scale
    sample, emb = torch.randn(2, 4, h, w), torch.randn(2, 77, e0.text_dim)
    levels = e0.level_shapes(args.size, args.size)
    rect = Rectification({a * b: torch.zeros(2, a * b, 77) for a, b in levels}, torch.tensor([0.3, 0.0]))
    t = torch.tensor(500.0)
    for rep in range(args.unet_calls + 2):
        for name, engine in engines.items():
            runner = engine.runner()
            start = time.perf_counter()
            runner(sample, t, emb, rect)
            if rep >= 2:
                unet[name].append(time.perf_counter() - start)

    a, b = (results[n].latents for n in engines)
    med = {n: statistics.median(v) for n, v in sampling.items()}
    med_unet = {n: statistics.median(v) for n, v in unet.items()}
    print(f"machine: {machine()['cpu']}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"python {sys.version.split()[0]}, torch {torch.__version__}")
    print(f"model: {e0.components.model_id}, {args.size}x{args.size}, {args.steps} steps (all guided, "
          f"{2 * args.steps} UNet calls of batch 2), repeats {args.repeats}, UNet calls timed {args.unet_calls}")
    print()
    print("| backend | sampling loop s (median) | one UNet call ms (median) |")
    print("| --- | ---: | ---: |")
    for n in engines:
        print(f"| {n} | {med[n]:.3f} | {1000 * med_unet[n]:.2f} |")
    print()
    names = list(engines)
    print(f"ratio torch / onnxruntime: sampling {med[names[0]] / med[names[1]]:.2f}x, "
          f"UNet call {med_unet[names[0]] / med_unet[names[1]]:.2f}x (>1 = onnxruntime faster)")
    diff = float((a - b).abs().max())
    print(f"parity: final latents max abs diff {diff:.3g}")
    if args.json:
        import onnxruntime

        manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
        out = {"meta": {"torch_threads": torch.get_num_threads(),
                        "ort_threads": args.threads, "python": sys.version.split()[0], "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "model_id": e0.components.model_id,
                        "size": args.size, "steps": args.steps, "repeats": args.repeats,
                        "unet_calls": args.unet_calls},
               "sampling_s": {n: {"median": med[n], "runs": sampling[n]} for n in engines},
               "unet_call_ms": {n: {"median": 1000 * med_unet[n], "runs": [1000 * x for x in unet[n]]}
                                for n in engines},
               "ratio_torch_over_ort": {"sampling": med[names[0]] / med[names[1]],
                                        "unet_call": med_unet[names[0]] / med_unet[names[1]]},
               "final_latents_max_abs_diff": diff,
               "export_check": {name: m.get("verified") for name, m in manifest.get("models", {}).items()}}
        write_result(args.json, out["meta"], out, script="bench/export_parity.py")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
