"""Flags and parsing shared by subcommands (model, device, dtype, backend, KEY=VALUE pairs)."""
from __future__ import annotations

import argparse

from ..errors import Cones2Error


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers-layout SD checkpoint dir or hub id (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", default=None,
                   help="reference, sdpa, triton, onnxruntime or tensorrt (default: triton on CUDA, sdpa on CPU)")
    p.add_argument("--onnx", default=None, help="exported ONNX directory, for --backend onnxruntime")
    p.add_argument("--trt", default=None, help="TensorRT engine directory, for --backend tensorrt")


def load_engine(args):
    """An Engine from the model flags."""
    from ..engine import Engine

    dtype = args.dtype or ("fp16" if str(args.device).startswith("cuda") else "fp32")
    options = {}
    if args.backend == "onnxruntime":
        if not args.onnx:
            raise Cones2Error("--backend onnxruntime needs --onnx DIR (see `cones2-engine export onnx`)", "onnx")
        options["onnx_dir"] = args.onnx
    if args.backend == "tensorrt":
        if not args.trt:
            raise Cones2Error("--backend tensorrt needs --trt DIR (see `cones2-engine export tensorrt`)", "trt")
        options["engine_dir"] = args.trt
    return Engine.from_pretrained(args.model, device=args.device, dtype=dtype, backend=args.backend,
                                  backend_options=options)


def key_value(text: str, flag: str) -> tuple[str, str]:
    """Split NAME=VALUE; a clear error names the flag otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise Cones2Error(f"expected NAME=VALUE, got {text!r}", flag)
    return name.strip(), value.strip()


def numbers(text: str, flag: str, count: int | None = None) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise Cones2Error(f"expected comma-separated numbers, got {text!r}", flag) from None
    if count is not None and len(vals) != count:
        raise Cones2Error(f"expected {count} numbers, got {len(vals)} in {text!r}", flag)
    return vals
