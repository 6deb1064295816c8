#!/usr/bin/env python
"""Guided cross-attention microbenchmark alone: every backend next to plain SDPA, as ratios of one run.

    python bench/attention_bench.py                       # SD 2.1 768-px shapes, what can run here
    TRITON_INTERPRET=1 python bench/attention_bench.py --tiny --json out/attn.json   # seconds, CPU

`--tiny` swaps SD 2.1's shapes for two small ones (a smoke run, e.g. on a CPU with Triton
interpreted). Exit code 2 for a bad argument or a requested backend that cannot run here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cones2.precision import default_dtype  # noqa: E402
from harness.attention import BACKENDS, SD21_CROSS_ATTENTION, run_attention_benchmark  # noqa: E402

TINY_SHAPES = ((144, 2, 32), (64, 2, 16))   # (N, heads, head dim)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else why not."""
    if backend in ("reference", "sdpa"):
        return None
    if backend == "triton":
        try:
            from cones2.kernels.triton_rectified import interpreting
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        return None if device.type == "cuda" or interpreting() else "needs CUDA (or TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return "the CUDA twin needs a CUDA device"
    from cones2.kernels.errors import KernelUnavailableError
    from cones2.kernels import cuda_loader

    try:
        cuda_loader.load_library()
    except KernelUnavailableError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/attention_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--backends", default=None, help=f"comma list of {', '.join(BACKENDS)} (default: what can run)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default: 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls of long cases (default: 3)")
    p.add_argument("--tiny", action="store_true", help=f"small shapes {TINY_SHAPES} instead of SD 2.1's")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or default_dtype(device)]
    asked = [b.strip() for b in args.backends.split(",")] if args.backends else list(BACKENDS)
    unknown = [b for b in asked if b not in BACKENDS]
    if unknown or args.warmup < 0 or args.repeat < 1:
        p.error(f"unknown backends {unknown}" if unknown else "--warmup must be >= 0 and --repeat >= 1")
    skipped = {b: why for b in asked if (why := unavailable(b, device))}
    if args.backends and skipped:
        print(f"{p.prog}: error: cannot run {'; '.join(f'{b}: {w}' for b, w in skipped.items())}", file=sys.stderr)
        return 2
    backends = [b for b in asked if b not in skipped]
    shapes = TINY_SHAPES if args.tiny else SD21_CROSS_ATTENTION
    rows = run_attention_benchmark(backends, device, dtype, args.warmup, args.repeat, shapes=shapes, progress=False)
    for r in rows:
        print(f"{r['shape']:<28} {r['impl']:<32} min {r['min_ms']:9.3f} ms  median {r['median_ms']:9.3f} ms  "
              f"ratio {r['ratio_vs_sdpa_plain']:6.2f}  ({r['runs']} runs, {r['timer']})")
    if args.json:
        meta = {"device": str(device), "dtype": args.dtype or str(dtype).replace("torch.", ""),
                "backends": backends, "shapes": [list(s) for s in shapes], "warmup": args.warmup,
                "repeat": args.repeat, "torch": torch.__version__, "python": platform.python_version(),
                "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
                "command": " ".join(["python", "bench/attention_bench.py", *(argv if argv is not None else sys.argv[1:])])}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "skipped": skipped, "attention": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
