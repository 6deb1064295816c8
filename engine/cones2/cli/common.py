"""Flags and parsing shared by subcommands (model, device, dtype, backend, threads, KEY=VALUE pairs)."""
from __future__ import annotations

import argparse

from .. import limits
from ..errors import Cones2Error, quote


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers-layout SD checkpoint dir or hub id (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", default=None,
                   help="reference, sdpa, triton, xformers, onnxruntime or tensorrt (default, or $CONES2_BACKEND: "
                        "triton on CUDA; on the CPU onnxruntime with an export cached on first use, sdpa "
                        "without the export extra or with --compile)")
    p.add_argument("--onnx", default=None,
                   help="exported ONNX directory for onnxruntime (implies --backend onnxruntime; default: the "
                        "export cached per model)")
    p.add_argument("--trt", default=None, help="TensorRT engine directory, for --backend tensorrt")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CUDA graphs on CUDA); composes with every attention backend "
                        "(reference, sdpa, triton, xformers; without --backend the best of them). "
                        "The first generation at a new size compiles (minutes on a small CPU; docs/speed.md)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: measured rule of cones2.threads; OMP_NUM_THREADS is respected)")


def check_model_flags(args) -> dict:
    """Check device, dtype and backend flags without loading anything (a bad value answers at once);
    returns the keyword arguments for `Engine.from_pretrained`."""
    from ..backends import ATTENTION, get_spec, why_unavailable
    from ..loading import parse_device, parse_dtype

    device = parse_device(args.device)
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    parse_dtype(dtype, device)
    options = {}
    if args.backend is None and getattr(args, "onnx", None):
        args.backend = "onnxruntime"
    if args.backend is not None:
        spec = get_spec(args.backend)
        why = why_unavailable(args.backend, device)
        if why is not None:
            raise Cones2Error(f"{quote(args.backend)} cannot run on {device.type}: {why}", "backend")
        for name, need, flag, target in (("onnxruntime", "onnx_dir", "onnx", "onnx"),
                                         ("tensorrt", "engine_dir", "trt", "tensorrt")):
            given = getattr(args, flag, None)
            if need in spec.needs and not given:
                raise Cones2Error(f"--backend {args.backend} needs --{flag} DIR "
                                  f"(see `cones2-engine export {target}`)", flag)
            if given and args.backend != name:
                raise Cones2Error(f"is for --backend {name}, not {args.backend}", flag)
            if given:
                options[need] = given
        if getattr(args, "compile", False) and spec.kind != ATTENTION:
            raise Cones2Error(f"--backend {args.backend} runs its own compiled graphs; --compile applies to "
                              "the attention backends (reference, sdpa, triton)", "compile")
    return {"device": args.device, "dtype": dtype, "backend": args.backend, "backend_options": options,
            "compile": bool(getattr(args, "compile", False))}


def load_engine(args, checked: dict | None = None):
    """An Engine from the model flags (`checked`: what `check_model_flags` returned, if already called)."""
    from ..engine import Engine

    return Engine.from_pretrained(args.model, **(checked or check_model_flags(args)))


def key_value(text: str, flag: str) -> tuple[str, str]:
    """Split NAME=VALUE (NAME a subject word); a clear error names the flag otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise Cones2Error(f"expected NAME=VALUE, got {quote(text)}", flag)
    return limits.name(name.strip(), flag), value.strip()


def numbers(text: str, flag: str, count: int | None = None) -> list[float]:
    """Comma-separated numbers (exactly `count` of them when given)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise Cones2Error(f"expected comma-separated numbers, got {quote(text)}", flag) from None
    if count is not None and len(vals) != count:
        raise Cones2Error(f"expected {count} numbers, got {len(vals)} in {quote(text)}", flag)
    return vals
