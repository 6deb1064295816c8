"""Latency profile of the engine on this device, every backend measured side by side in one run.

`python bench/latency.py` and `cones2-engine bench` run this. Sections: stage times (text encoding,
residual composition, layout maps, one UNet step guided with self-recurrence / unguided, VAE
decode), attention microbenchmarks on SD 2.1's 768-px cross-attention shapes (cones2.kernels.
benchmark), and end-to-end generation for each backend next to the reference-implementation style
(materialised fp32 attention everywhere, conditional and unconditional branches as separate UNet
calls) and next to unguided sampling with the same UNet calls. Speedups are ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from .attention import Rectification
from .errors import Cones2Error
from cones2.kernels.benchmark import PeakMemory, measure, run_attention_benchmark

WORDS = ("dog", "mug", "cat", "vase", "hat", "book", "lamp", "ball")
PAPER_STYLE = "paper-style"


# ---- arguments ----------------------------------------------------------------------------------
def default_sd21_config() -> Path:
    """../shared/sd21-configs next to the repository (CI), else next to the working directory."""
    repo = Path(__file__).resolve().parent.parent
    for base in (repo, Path.cwd()):
        path = (base / ".." / "shared" / "sd21-configs").resolve()
        if path.is_dir():
            return path
    return (repo / ".." / "shared" / "sd21-configs").resolve()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers checkpoint dir or hub id (default: the embedded tiny model)")
    p.add_argument("--shape", choices=("embedded", "sd21"), default="embedded",
                   help="sd21: a randomly initialised full-size SD 2.1 (768 px) from --sd21-config, real shapes "
                        "without weights (big: use bf16, a lower --resolution and few --steps on a CPU)")
    p.add_argument("--sd21-config", type=Path, default=None,
                   help=f"SD 2.1 component configs (default: {default_sd21_config()})")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="output side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--guidance-steps", type=int, default=None, help="guided steps G (default: all)")
    p.add_argument("--subjects", type=int, default=2, help=f"subjects in the layout, 1..{len(WORDS)} (default: 2)")
    p.add_argument("--backends", default=None,
                   help="comma list of reference, sdpa, triton, torch (= the default PyTorch backend), "
                        "onnxruntime (needs --onnx) (default: what can run here)")
    p.add_argument("--onnx", default=None, help="exported ONNX directory, for the onnxruntime backend")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default: 1)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs; the fastest is reported, the least disturbed by other load (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention microbenchmarks")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def triton_status(device: torch.device) -> str | None:
    """None when the triton backend can run on `device`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    from cones2.kernels.triton_rectified import interpreting

    if device.type != "cuda" and not interpreting():
        return "needs CUDA (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
    return None


def resolve_backends(text: str | None, device: torch.device, onnx: str | None) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {skipped backend: reason})."""
    skipped: dict[str, str] = {}
    triton_why = triton_status(device)
    if text is None:
        names = ["reference", "sdpa", "triton"] + (["onnxruntime"] if onnx else [])
        if triton_why:
            skipped["triton"] = triton_why
            names.remove("triton")
        return names, skipped
    default_torch = "triton" if device.type == "cuda" and not triton_why else "sdpa"
    names = []
    for raw in text.split(","):
        name = {"torch": default_torch}.get(raw.strip(), raw.strip())
        if name not in ("reference", "sdpa", "triton", "onnxruntime"):
            raise Cones2Error(f"unknown backend {raw.strip()!r}; choose reference, sdpa, triton, torch, onnxruntime",
                              "backends")
        if name == "triton" and triton_why:
            skipped[name] = triton_why
        elif name == "onnxruntime" and not onnx:
            skipped[name] = "needs --onnx DIR (see `cones2-engine export onnx`)"
        elif name not in names:
            names.append(name)
    if not names:
        raise Cones2Error(f"none of {text!r} can run here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})",
                          "backends")
    return names, skipped


# ---- the engine and the workload ----------------------------------------------------------------
def build_sd21_engine(config_dir: Path, device: torch.device, dtype: torch.dtype):
    """A randomly initialised full-size SD 2.1 Engine from diffusers/transformers config files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from .engine import Engine
    from .loading import Components
    from .tokenizer_data import build_clip_tokenizer

    files = {n: config_dir / f"{n}.json" for n in ("unet", "vae", "text_encoder", "scheduler")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise Cones2Error(f"SD 2.1 configs not found: {', '.join(missing)}", "sd21_config")
    cfg = {n: json.loads(p.read_text()) for n, p in files.items()}
    torch.manual_seed(0)
    quiet = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no "keep these modules in float32" notice: weights are random
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg["unet"]).to(dtype)
            vae = AutoencoderKL.from_config(cfg["vae"]).to(dtype)
            text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(dtype)
    finally:
        diffusers_logging.set_verbosity(quiet)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    components = Components(build_clip_tokenizer(pad_token="!"), text_encoder, unet, vae, cfg["scheduler"],
                            str(config_dir), "sd21-random-init")
    return Engine(components, device, dtype, backend="sdpa")


class UnbatchedCfgRunner:
    """The reference implementation's UNet use: the conditional and unconditional branches as two
    separate calls (batch R each) instead of one call of batch 2R. Same results (per-sample std)."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, sample, timestep, embeddings, rectification):
        R = sample.shape[0] // 2
        cond_rect = None
        if rectification is not None:
            cond_rect = Rectification({n: w[:R] for n, w in rectification.weights.items()}, rectification.coef[:R])
        e_cond = self.runner(sample[:R], timestep, embeddings[:R], cond_rect)
        e_uncond = self.runner(sample[R:], timestep, embeddings[R:], None)
        return torch.cat([e_cond, e_uncond])


class Workload:
    """Prompt with K subject words, a random residual for each, boxes side by side."""

    def __init__(self, engine, subjects: int, resolution: int, steps: int, guidance_steps: int | None):
        from .layout import Layout
        from .residual import Residual
        from .tokens import word_token_ids

        if not 1 <= subjects <= len(WORDS):
            raise Cones2Error(f"must be in [1, {len(WORDS)}], got {subjects}", "subjects")
        words = WORDS[:subjects]
        self.prompt = "a photo of " + " and ".join(f"a {w}" for w in words)
        g = torch.Generator().manual_seed(0)
        self.residuals = {w: Residual(0.05 * torch.randn(len(word_token_ids(engine.tokenizer, w)), engine.text_dim,
                                                         generator=g), word=w) for w in words}
        self.layout = Layout.from_boxes({w: (j / subjects + 0.02, 0.3, (j + 1) / subjects - 0.02, 0.95)
                                         for j, w in enumerate(words)})
        self.settings = dict(steps=steps, guidance_steps=guidance_steps, height=resolution, width=resolution, seed=0)

    def request(self, engine, guided: bool = True):
        return engine.request(self.prompt, self.residuals, self.layout if guided else None, **self.settings)


def unet_calls(steps: int, guidance_steps: int) -> int:
    """UNet calls (of batch 2: both CFG branches) in one sampling run: self-recurrence doubles G steps."""
    return steps + guidance_steps


# ---- the three sections -------------------------------------------------------------------------
def stage_times(engine, work: Workload, backends: list[str], args) -> list[dict]:
    """Each stage of one generation, timed alone."""
    from .embeddings import add_residuals
    from .tokens import SEQ_LEN, locate_subject, prompt_token_ids

    dev, run = engine.device, (lambda fn: measure(fn, engine.device, args.warmup, args.repeat))
    req = work.request(engine)
    c = req.config
    ids = prompt_token_ids(engine.tokenizer, work.prompt)
    tokens = {w: locate_subject(engine.tokenizer, ids, w) for w in work.residuals}
    rows = []

    def add(stage, fn, calls=None):
        rows.append({"stage": stage, **run(fn), "unet_calls": calls})

    with torch.no_grad():
        cond, uncond = engine.encode([work.prompt, ""])
        add("text encoding (prompt + empty)", lambda: engine.encode([work.prompt, ""]))
        add("residual composition", lambda: add_residuals(cond, [(tokens[w], r) for w, r in work.residuals.items()]))
        levels = engine.level_shapes(c.height, c.width)
        positions = {w: t.word_positions for w, t in tokens.items()}
        add("layout maps (all levels)", lambda: work.layout.weight_maps(positions, c.height, c.width, levels,
                                                                         c.negative_weight, SEQ_LEN, dev))
        maps = work.layout.weight_maps(positions, c.height, c.width, levels, c.negative_weight, SEQ_LEN, dev)
        weights = {n: torch.stack([w, torch.zeros_like(w)]) for n, w in maps.items()}
        # coef at SD's first sigma (~14.6); the uncond half of the CFG batch has coef 0 (SPEC 3)
        rect = Rectification(weights, torch.tensor([c.guidance_weight * math.log(1 + 14.6 ** 2), 0.0], device=dev))
        h, w = levels[0]
        x = torch.randn(2, engine.unet.config.in_channels, h, w, generator=torch.Generator().manual_seed(0))
        x, t, emb = x.to(dev, engine.dtype), torch.tensor(500.0, device=dev), torch.stack([cond, uncond])
        for name in [b for b in backends if b != "onnxruntime"] + [PAPER_STYLE]:
            runner = engine.runner(name)
            calls = 4 if name == PAPER_STYLE else 2
            add(f"UNet guided step + self-recurrence [{name}]",
                lambda: (runner(x, t, emb, rect), runner(x, t, emb, rect)), calls)
            add(f"UNet unguided step [{name}]", lambda: runner(x, t, emb, None), calls // 2)
        latents = torch.randn(1, engine.unet.config.in_channels, h, w, generator=torch.Generator().manual_seed(1))
        add("VAE decode", lambda: engine.decode(latents.to(dev)))
    return rows


def end_to_end(engine, work: Workload, backends: list[str], args) -> list[dict]:
    """Whole generations per backend, guided and unguided with the same UNet calls, and the paper
    style. Runs are interleaved (one of each job per round) so slow drift on a shared machine hits
    every job alike; each job reports its fastest round."""
    from tqdm.auto import tqdm

    G = work.request(engine).config.guidance_steps
    S = work.settings["steps"]
    jobs = [(b, True) for b in backends] + [(b, False) for b in backends] + [(PAPER_STYLE, True)]
    runs = {}
    for name, guided in jobs:
        req = work.request(engine, guided)
        runs[name, guided] = lambda req=req, name=name: engine.generate_batch([req], backend=name, progress=False)
    times = {job: [] for job in jobs}
    rounds = [None] * args.warmup + list(range(args.repeat))
    for r in tqdm(rounds, desc="end-to-end rounds", disable=args.no_progress, leave=False):
        for job in jobs:
            t = measure(runs[job], engine.device, 0, 1)["min_ms"]
            if r is not None:
                times[job].append(t)
    rows = []
    for name, guided in jobs:
        with PeakMemory(engine.device) as mem:
            runs[name, guided]()
        ts = times[name, guided]
        rows.append({"backend": name, "guided": guided, "min_ms": min(ts), "median_ms": statistics.median(ts),
                     "runs": len(ts), "unet_calls": unet_calls(S, G) * (2 if name == PAPER_STYLE else 1),
                     "unet_batch": 1 if name == PAPER_STYLE else 2, "peak_bytes": mem.peak})
    paper = next(r["min_ms"] for r in rows if r["backend"] == PAPER_STYLE)
    unguided = {r["backend"]: r["min_ms"] for r in rows if not r["guided"]}
    for r in rows:
        r["speedup_vs_paper_style"] = paper / r["min_ms"]
        r["guided_over_unguided"] = r["min_ms"] / unguided[r["backend"]] if r["guided"] and r["backend"] in unguided \
            else None
    return rows


# ---- report -------------------------------------------------------------------------------------
def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def _mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def report(results: dict) -> None:
    meta = results["meta"]
    print(f"cones2 latency: {meta['model']} at {meta['resolution']} px, {meta['steps']} steps "
          f"(G={meta['guidance_steps']}), {meta['subjects']} subjects, {meta['dtype']} on {meta['device_name']}")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    print_table("stages (ms, fastest of the timed runs)", ["stage", "ms", "UNet calls"],
                [[r["stage"], _fmt(r["min_ms"]), _fmt(r["unet_calls"])] for r in results["stages"]])
    if results["attention"]:
        print_table("guided cross-attention, SD 2.1 768-px shapes (ratio = time / plain SDPA of the same shape)",
                    ["shape", "implementation", "ms", "ratio", "peak MiB"],
                    [[r["shape"], r["impl"], _fmt(r["min_ms"], ".3f"), _fmt(r["ratio_vs_sdpa_plain"]),
                      _mb(r["peak_bytes"])] for r in results["attention"]])
    print_table("end-to-end generation (ms per image; speedup vs the paper-style path in this run)",
                ["backend", "guided", "ms", "UNet calls x batch", "speedup", "guided/unguided", "peak MiB"],
                [[r["backend"], "yes" if r["guided"] else "no", _fmt(r["min_ms"], ".1f"),
                  f"{r['unet_calls']} x {r['unet_batch']}", _fmt(r["speedup_vs_paper_style"]),
                  _fmt(r["guided_over_unguided"]), _mb(r["peak_bytes"])] for r in results["end_to_end"]])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


# ---- entry points -------------------------------------------------------------------------------
def run(args) -> int:
    from .loading import parse_device, parse_dtype

    if args.threads is not None:
        if args.threads < 1:
            raise Cones2Error(f"must be positive, got {args.threads}", "threads")
        torch.set_num_threads(args.threads)
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"), device)
    for flag, low in (("steps", 1), ("warmup", 0), ("repeat", 1)):
        if getattr(args, flag) < low:
            raise Cones2Error(f"must be >= {low}, got {getattr(args, flag)}", flag)
    backends, skipped = resolve_backends(args.backends, device, args.onnx)

    if args.shape == "sd21":
        config_dir = args.sd21_config or default_sd21_config()
        print(f"building a randomly initialised SD 2.1 from {config_dir} ...", file=sys.stderr)
        engine = build_sd21_engine(config_dir, device, dtype)
        model = "SD 2.1 shapes (random init)"
    else:
        from .engine import Engine

        engine = Engine.from_pretrained(args.model, device=device, dtype=dtype, backend="sdpa")
        model = args.model or "embedded tiny model"
    for name in list(backends):
        try:
            engine.runner(name, **({"onnx_dir": args.onnx} if name == "onnxruntime" else {}))
        except (Cones2Error, ImportError, RuntimeError, OSError) as exc:
            skipped[name] = f"cannot build its runner: {exc}"
            backends.remove(name)
    if not backends:
        raise Cones2Error("no backend can run here", "backends")
    engine.add_runner(PAPER_STYLE, UnbatchedCfgRunner(engine.runner("reference")))

    resolution = args.resolution or engine.default_resolution
    work = Workload(engine, args.subjects, resolution, args.steps, args.guidance_steps)
    G = work.request(engine).config.guidance_steps
    results = {"meta": {"model": model, "device": str(device), "device_name": device_name(device),
                        "dtype": str(dtype).replace("torch.", ""), "resolution": resolution, "steps": args.steps,
                        "guidance_steps": G, "subjects": args.subjects, "backends": backends,
                        "warmup": args.warmup, "repeat": args.repeat, "torch": torch.__version__,
                        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
               "skipped": skipped}
    results["stages"] = stage_times(engine, work, backends, args)
    if args.no_attention:
        results["attention"] = []
    else:
        micro = [b for b in backends if b in ("reference", "sdpa", "triton")]
        if device.type == "cuda":
            micro += _cuda_twin(skipped)
        results["attention"] = run_attention_benchmark(micro, device, dtype, args.warmup, args.repeat,
                                                   progress=not args.no_progress)
    results["end_to_end"] = end_to_end(engine, work, backends, args)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def _cuda_twin(skipped: dict) -> list[str]:
    """['cuda'] when the CUDA twin library loads, else a skip reason."""
    try:
        from cones2.kernels import cuda_loader

        cuda_loader.load_library()
        return ["cuda"]
    except Cones2Error as exc:
        skipped["cuda twin"] = str(exc)
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Cones2Error as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
