#!/usr/bin/env python
"""Latency profile of cones2-engine on this device, every backend measured side by side in one run.

Sections: stage times (text encoding, residual composition, layout maps, one UNet step guided with
self-recurrence / unguided, VAE decode), attention microbenchmarks on SD 2.1's 768-px
cross-attention shapes, and end-to-end generation for each backend next to the reference-
implementation style (materialised fp32 attention, conditional and unconditional branches as
separate UNet calls) and next to unguided sampling with the same UNet calls. Speedups are ratios
of one run. Which backends can run here comes from the engine's registry (`cones2.backends`).

    python bench/latency.py --steps 4                        # the embedded model, this device
    python bench/latency.py --shape sd21 --dtype fp16 --steps 50 --subjects 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cones2 import Cones2Error, Engine  # noqa: E402
from cones2.backends import ATTENTION, backend_names, select_backend, why_unavailable  # noqa: E402
from cones2.cli.exit_codes import run_cli  # noqa: E402
from cones2.loading import parse_device, parse_dtype  # noqa: E402
from cones2.precision import default_dtype  # noqa: E402
from harness.random_model import random_components  # noqa: E402
from cones2.threads import configure_threads  # noqa: E402
from harness.attention import run_attention_benchmark  # noqa: E402
from harness.report import device_name, report  # noqa: E402
from harness.sections import end_to_end, stage_times  # noqa: E402
from harness.workload import Workload  # noqa: E402

SD21_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd21"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="diffusers checkpoint dir or hub id (default: the embedded model)")
    p.add_argument("--shape", choices=("embedded", "sd21"), default="embedded",
                   help="sd21: a randomly initialised full-size SD 2.1 (768 px) from --sd21-config, real shapes "
                        "without weights (big: use bf16, a lower --resolution and few --steps on a CPU)")
    p.add_argument("--sd21-config", type=Path, default=SD21_CONFIGS,
                   help="SD 2.1 component configs (default: bench/configs/sd21)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="output side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the mode's, 50 paper-exact, 20 fast)")
    p.add_argument("--guidance-steps", type=int, default=None,
                   help="guided steps G (default: the mode's, all paper-exact, the first 60%% fast)")
    p.add_argument("--mode", choices=("paper-exact", "fast"), default="paper-exact",
                   help="sampling mode (fast: DPM-Solver++ 2M, docs/speed.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for the attention backends (CUDA graphs on CUDA); compilation "
                        "happens in the --warmup runs, paper-style stays eager")
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                   help="torch.compile backend with --compile (aot_eager: the same tracing without code "
                        "generation, for smoke runs on a CPU)")
    p.add_argument("--no-official-fp32", action="store_true",
                   help="skip the reference implementation's own path (paper style with fp32 weights) that "
                        "runs next to the others when --dtype is not fp32")
    p.add_argument("--subjects", type=int, default=2, help="subjects in the layout (default: 2)")
    p.add_argument("--backends", default=None,
                   help="comma list of backends, or `torch` for the default one (default: every attention backend "
                        "that can run here, plus onnxruntime with --onnx)")
    p.add_argument("--onnx", default=None,
                   help="exported ONNX directory for onnxruntime (default when named in --backends: the export "
                        "cached per model, made on first use)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default: 1)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs; the fastest is reported, the least disturbed by other load (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the engine's)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention microbenchmarks")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_backends(text: str | None, device: torch.device, onnx: str | None) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {passed-over backend: why}), from the registry's own availability checks."""
    skipped: dict[str, str] = {}
    if text is None:
        wanted = [n for n in backend_names(ATTENTION) if n != "onnx"] + ["onnxruntime"]
    else:
        wanted = [select_backend(device)[0] if w.strip() == "torch" else w.strip() for w in text.split(",")]
    names = []
    for name in wanted:
        why = why_unavailable(name, device)  # unknown names raise, listing the known ones
        if why is None and name == "onnxruntime" and not onnx and text is None:   # named: the cached export
            why = "not by default without --onnx DIR (name it in --backends to use the export cached per model)"
        if why is not None:
            skipped[name] = why
        elif name not in names:
            names.append(name)
    if not names:
        raise Cones2Error(f"none of {text!r} can run here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})",
                          "backends")
    return names, skipped


def load_engine(args, device: torch.device, dtype: torch.dtype, first: str) -> tuple[Engine, str]:
    """The engine, built with the first benchmarked backend (so no other default is built, or exported)."""
    kw = dict(backend=first, backend_options={"onnx_dir": args.onnx} if first == "onnxruntime" and args.onnx else None,
              compile=args.compile)
    if args.shape == "sd21":
        print(f"building a randomly initialised SD 2.1 from {args.sd21_config} ...", file=sys.stderr)
        return Engine(random_components(args.sd21_config, device, dtype), device, dtype, **kw), "SD 2.1 shapes (random init)"
    return Engine.from_pretrained(args.model, device=device, dtype=dtype, **kw), args.model or "embedded model"


def run(args) -> int:
    configure_threads(args.threads)
    if args.steps is None:
        from cones2.modes import MODES

        args.steps = MODES[args.mode].default_steps
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or default_dtype(device), device)
    for flag, low in (("steps", 1), ("warmup", 0), ("repeat", 1)):
        if getattr(args, flag) < low:
            raise Cones2Error(f"must be >= {low}, got {getattr(args, flag)}", flag)
    backends, skipped = resolve_backends(args.backends, device, args.onnx)
    if args.compile:
        import cones2.compiled

        cones2.compiled.COMPILER = args.compiler
    engine, model = build_runners(args, device, dtype, backends, skipped)
    resolution = args.resolution or engine.default_resolution
    compile_meta = {}
    if args.compile:
        compile_meta, fallback = compile_probe(engine, backends, resolution)
        if fallback is not None:   # graph break under fullgraph=True on this torch: measure eager, say why
            print(f"bench/latency.py: --compile falls back to eager: {fallback}", file=sys.stderr)
            args.compile = False
            engine, model = build_runners(args, device, dtype, backends, skipped)
    work = Workload(engine, args.subjects, resolution, args.steps, args.guidance_steps, args.mode)
    G = work.request(engine).config.guidance_steps
    results = {"meta": {"model": model, "device": str(device), "device_name": device_name(device),
                        "dtype": str(dtype).replace("torch.", ""), "resolution": resolution, "steps": args.steps,
                        "guidance_steps": G, "mode": args.mode, "compile": args.compile, **compile_meta,
                        "subjects": args.subjects, "backends": backends,
                        "warmup": args.warmup, "repeat": args.repeat, "torch": torch.__version__,
                        "command": " ".join(["python bench/latency.py"] + sys.argv[1:])},
               "skipped": skipped}
    results["stages"] = stage_times(engine, work, backends, args.warmup, args.repeat)
    if args.no_attention:
        results["attention"] = []
    else:
        micro = [b for b in backends if b in ("reference", "sdpa", "triton")]
        if device.type == "cuda":
            micro += _cuda_twin(skipped)
        results["attention"] = run_attention_benchmark(micro, device, dtype, args.warmup, args.repeat,
                                                       progress=not args.no_progress)
    official = None
    if dtype != torch.float32 and not args.no_official_fp32:   # the same weights, as the official code runs them
        official = load_engine(argparse.Namespace(**{**vars(args), "compile": False}), device, torch.float32,
                               "reference")[0]     # it runs the paper-style runner; reference builds nothing
    results["end_to_end"] = end_to_end(engine, work, backends, args.warmup, args.repeat, not args.no_progress,
                                       official_fp32=official)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def build_runners(args, device: torch.device, dtype: torch.dtype, backends: list[str], skipped: dict):
    """The engine with a runner for each backend in `backends` (those whose runner cannot be built
    move to `skipped`, with the reason); (engine, model description)."""
    engine, model = load_engine(args, device, dtype, backends[0])
    for name in list(backends):
        try:
            engine.runner(name, **({"onnx_dir": args.onnx} if name == "onnxruntime" and args.onnx else {}))
        except (Cones2Error, ImportError, RuntimeError, OSError) as exc:
            skipped[name] = f"cannot build its runner: {exc}"
            backends.remove(name)
    if not backends:
        raise Cones2Error("no backend can run here", "backends")
    return engine, model


def compile_probe(engine, backends: list[str], resolution: int) -> tuple[dict, str | None]:
    """Compile each backend's graphs with one tiny generation at `resolution` (`Engine.warmup`), before
    anything is timed. Returns ({"compile_s": {backend: seconds}}, None), or, when torch.compile cannot
    make a full graph on this torch (a graph break under fullgraph=True, a backend compiler failure),
    ({"compile_requested": True, "compile_fallback": why}, why): the caller measures eager instead of
    losing the run."""
    from torch._dynamo.exc import TorchDynamoException

    spent = {}
    for name in backends:
        try:
            spent[name] = round(sum(engine.warmup([resolution], backend=name).values()), 3)
        except TorchDynamoException as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            why = f"backend {name}: {type(exc).__name__}: {first}"
            return {"compile_requested": True, "compile_fallback": why}, why
    return {"compile_s": spent}, None


def _cuda_twin(skipped: dict) -> list[str]:
    """['cuda'] when the CUDA twin library loads, else a skip reason."""
    from cones2.kernels.errors import KernelUnavailableError
    from cones2.kernels import cuda_loader

    try:
        cuda_loader.load_library()
        return ["cuda"]
    except KernelUnavailableError as exc:
        skipped["cuda twin"] = str(exc)
        return []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(parser.prog, lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
