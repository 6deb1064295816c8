"""The two engine sections of bench/latency.py: each stage of one generation timed alone, and whole
generations per backend (guided, unguided with the same UNet calls, and the paper-style path)."""
from __future__ import annotations

import math
import statistics

import torch
from tqdm.auto import tqdm

from cones2.attention import Rectification
from cones2.embeddings import add_residuals
from cones2.tokens import SEQ_LEN

from .timing import PeakMemory, measure
from .workload import PAPER_STYLE, unet_calls

SD_FIRST_SIGMA = 14.6  # SD's largest training sigma: the coefficient of the first guided step
OFFICIAL_FP32 = "paper-style fp32"  # the reference implementation as it ships: paper style, fp32 weights


def stage_times(engine, work, backends: list[str], warmup: int, repeat: int) -> list[dict]:
    """Each stage of one generation, timed alone: text encoding, residuals, layout maps, one UNet
    step guided (with its self-recurrence pass) and unguided per backend, VAE decoding."""
    dev = engine.device
    req = work.request(engine)
    c = req.config
    tokens = {t.name: t for t in engine.check(req)}
    rows = []

    def add(stage, fn, calls=None):
        rows.append({"stage": stage, **measure(fn, dev, warmup, repeat), "unet_calls": calls})

    with torch.no_grad():
        cond, uncond = engine.encode([work.prompt, ""])
        add("text encoding (prompt + empty)", lambda: engine.encode([work.prompt, ""]))
        add("residual composition", lambda: add_residuals(cond, [(tokens[w], r) for w, r in work.residuals.items()]))
        levels = engine.level_shapes(c.height, c.width)
        positions = {w: t.word_positions for w, t in tokens.items()}
        maps_of = lambda: work.layout.weight_maps(positions, c.height, c.width, levels,  # noqa: E731
                                                  c.negative_weight, SEQ_LEN, dev)
        add("layout maps (all levels)", maps_of)
        weights = {n: torch.stack([w, torch.zeros_like(w)]) for n, w in maps_of().items()}
        # the uncond half of the CFG batch has coef 0 (SPEC 3)
        coef = torch.tensor([c.guidance_weight * math.log(1 + SD_FIRST_SIGMA ** 2), 0.0], device=dev)
        rect = Rectification(weights, coef)
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


def end_to_end(engine, work, backends: list[str], warmup: int, repeat: int, progress: bool = True,
               official_fp32=None) -> list[dict]:
    """Whole generations per backend, guided and unguided with the same UNet calls, and the paper
    style; with `official_fp32` (the same model in fp32) also the paper style as the official code
    runs it, in fp32. Runs are interleaved (one of each job per round) so slow drift on a shared
    machine hits every job alike; each job reports its fastest round."""
    G = work.request(engine).config.guidance_steps
    S = work.settings["steps"]
    jobs = [(b, True) for b in backends] + [(b, False) for b in backends] + [(PAPER_STYLE, True)]
    runs = {}
    for name, guided in jobs:
        req = work.request(engine, guided)
        runs[name, guided] = lambda req=req, name=name: engine.generate_batch([req], backend=name, progress=False)
    if official_fp32 is not None:
        job = (OFFICIAL_FP32, True)
        jobs.append(job)
        req32 = work.request(official_fp32)
        runs[job] = lambda: official_fp32.generate_batch([req32], backend=PAPER_STYLE, progress=False)
    times = {job: [] for job in jobs}
    rounds = [None] * warmup + list(range(repeat))
    for r in tqdm(rounds, desc="end-to-end rounds", disable=not progress, leave=False):
        for job in jobs:
            t = measure(runs[job], engine.device, 0, 1)["min_ms"]
            if r is not None:
                times[job].append(t)
    rows = []
    for name, guided in jobs:
        with PeakMemory(engine.device) as mem:
            runs[name, guided]()
        ts = times[name, guided]
        unbatched = name in (PAPER_STYLE, OFFICIAL_FP32)
        rows.append({"backend": name, "guided": guided, "min_ms": min(ts), "median_ms": statistics.median(ts),
                     "runs": len(ts), "unet_calls": unet_calls(S, G) * (2 if unbatched else 1),
                     "unet_batch": 1 if unbatched else 2, "peak_bytes": mem.peak})
    paper = next(r["min_ms"] for r in rows if r["backend"] == PAPER_STYLE)
    official = next((r["min_ms"] for r in rows if r["backend"] == OFFICIAL_FP32), None)
    unguided = {r["backend"]: r["min_ms"] for r in rows if not r["guided"]}
    for r in rows:
        r["speedup_vs_paper_style"] = paper / r["min_ms"]
        r["speedup_vs_official_fp32"] = official / r["min_ms"] if official is not None else None
        r["guided_over_unguided"] = r["min_ms"] / unguided[r["backend"]] if r["guided"] and r["backend"] in unguided \
            else None
    return rows
