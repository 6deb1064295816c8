"""Flags and parsing shared by subcommands (model, device, dtype, backend, threads, KEY=VALUE pairs)."""
from __future__ import annotations

import argparse

from .. import limits
from ..errors import Cones2Error, quote


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --backend, each runner option's flag (--onnx, --trt, ...) and
    --compile. Backend names, option flags and help texts come from the registry (`cones2.backends`)."""
    from .. import backends

    attention = ", ".join(backends.backend_names(backends.ATTENTION))
    runners = ", ".join(backends.backend_names(backends.RUNNER))
    p.add_argument("--model", help="diffusers-layout SD checkpoint dir, hub id, or a single-file .safetensors/.ckpt "
                   "(SD 1.x/2.x original layout; default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 elsewhere)")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help=f"attention backend ({attention}) or UNet runner ({runners}); default: the best that "
                        f"runs on the device ({_defaults_text()}), or ${backends.DEFAULT_ENV}")
    for spec, option in backends.option_flags():
        if option.flag:
            implies = f"; implies --backend {spec.name}" if option.selects else f"; for --backend {spec.name}"
            p.add_argument(f"--{option.flag}", default=None, metavar=option.metavar, help=escape(option.help + implies))
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CUDA graphs on CUDA); composes with every attention backend "
                        f"({', '.join(s.name for s in backends.specs() if s.compilable)}; without --backend "
                        "the best of them). The first generation at a new size compiles (minutes on a small "
                        "CPU; docs/speed.md)")


def _defaults_text() -> str:
    """Which backend is the default where, read from the specs' `default_on` and `priority`."""
    from .. import backends

    by_device: dict[str, list] = {}
    for spec in backends.specs():
        if not spec.needs:
            for device in spec.default_on:
                by_device.setdefault(device, []).append(spec)
    return "; ".join(f"{device}: " + " else ".join(s.name for s in sorted(found, key=lambda s: -s.priority))
                     for device, found in sorted(by_device.items()))


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: measured rule of cones2.threads; OMP_NUM_THREADS is respected)")


def add_mode_flag(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--mode with its choices and help from the mode table (`cones2.modes`)."""
    from ..modes import describe, mode_names

    p.add_argument("--mode", choices=mode_names(), default=default, help=escape(describe()))


def escape(text: str) -> str:
    """`text` as an argparse help string (which %-formats it)."""
    return text.replace("%", "%%")


def backend_choice(args, device=None) -> tuple[str | None, dict]:
    """(backend, backend_options) from --backend and the runners' option flags, checked against the
    registry: an unknown name, a backend that cannot run on `device` (when given: a Ray head node
    may not have the replicas' device), a flag for another backend, a missing required option and
    --compile with a UNet runner are one-line errors; a flag that selects its backend (--onnx DIR)
    picks it. The CLI and the Ray deployment's options (`cones2-engine serve --ray`) take it from here."""
    from ..backends import get_spec, option_flags, why_unavailable

    given = {(spec.name, o.name): (o, getattr(args, o.flag.replace("-", "_"), None))
             for spec, o in option_flags() if o.flag}
    backend = args.backend
    if backend is None:
        chosen = sorted({name for (name, _), (o, value) in given.items() if value and o.selects})
        backend = chosen[0] if len(chosen) == 1 else None
    if backend is not None:
        get_spec(backend)                                   # an unknown name lists the known ones
        why = why_unavailable(backend, device) if device is not None else None
        if why is not None:
            raise Cones2Error(f"{quote(backend)} cannot run on {torch_device_type(device)}: {why}", "backend")
    options = {}
    for (name, key), (option, value) in given.items():
        if value and name != backend:
            raise Cones2Error(f"is for --backend {name}, not {backend or 'the default'}", option.flag)
        if value:
            options[key] = value
    if backend is not None:
        spec = get_spec(backend)
        for option in spec.options:
            if option.name in spec.needs and option.name not in options:
                made = f" (see `{option.made_by}`)" if option.made_by else ""
                raise Cones2Error(f"--backend {backend} needs --{option.flag} {option.metavar}{made}", option.flag)
        if getattr(args, "compile", False) and not spec.compilable:
            raise Cones2Error(f"--backend {backend} runs its own compiled graphs; --compile applies to the "
                              f"attention backends", "compile")
    return backend, options


def torch_device_type(device) -> str:
    """"cuda" for "cuda:1", and so on (for messages)."""
    import torch

    return torch.device(device).type


def check_model_flags(args) -> dict:
    """Check device, dtype and backend flags without loading anything (a bad value answers at once);
    returns the keyword arguments for `Engine.from_pretrained`."""
    from ..loading import parse_device, parse_dtype
    from ..precision import default_dtype

    device = parse_device(args.device)
    dtype = args.dtype or default_dtype(device)
    parse_dtype(dtype, device)
    backend, options = backend_choice(args, device)
    args.backend = backend
    return {"device": args.device, "dtype": dtype, "backend": backend, "backend_options": options,
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
