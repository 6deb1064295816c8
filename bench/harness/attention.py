"""Guided cross-attention microbenchmark over SD 2.1's 768-px cross-attention shapes (SPEC 3).

Every guided implementation is timed next to plain SDPA cross-attention of the same shape in the
same run, so the interesting number is a ratio: guided time / plain SDPA time. The Triton std
pre-pass and the fused kernel alone (std given) are timed separately from the full call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .timing import PeakMemory, measure

M_KEYS = 77
INTERPRETER_MAX_N = 576  # Triton's CPU interpreter needs minutes for the 9216-query shape
BACKENDS = ("reference", "sdpa", "triton", "cuda")
# (query count N, heads, head dim) of every cross-attention layer of the SD 2.1 UNet at 768 px:
# latent 96x96 and its three downsamplings; 320/640/1280/1280 channels in heads of 64 (unet.json).
SD21_CROSS_ATTENTION = ((9216, 5, 64), (2304, 10, 64), (576, 20, 64), (144, 20, 64))


@dataclass
class AttentionCase:
    """One implementation on one shape: its name and the call to time."""

    name: str
    fn: Callable[[], object]


def cfg_inputs(n: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A CFG pair as the engine batches it: sample 0 guided (coef > 0, a two-subject layout with
    +2.5 regions and -1e8 elsewhere), sample 1 unconditional (coef 0). Returns q, k, v, weight, coef."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(2, heads, n, dim, generator=g).to(device, dtype)
    k = torch.randn(2, heads, M_KEYS, dim, generator=g).to(device, dtype)
    v = torch.randn(2, heads, M_KEYS, dim, generator=g).to(device, dtype)
    weight = torch.zeros(2, n, M_KEYS)
    weight[0, :, 2] = weight[0, :, 5] = -1e8
    weight[0, : n // 2, 2] = 2.5
    weight[0, n // 2 :, 5] = 2.5
    coef = torch.tensor([0.08 * 9.0, 0.0])
    return q, k, v, weight.to(device), coef.to(device)


def attention_cases(q, k, v, weight, coef, backends: list[str]) -> list[AttentionCase]:
    """The implementations to time for one shape; `backends` picks among reference/sdpa/triton/cuda."""
    from cones2.attention import get_backend

    scale = q.shape[-1] ** -0.5
    cases = [AttentionCase("sdpa plain (baseline)", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))]
    if "reference" in backends:
        ref = get_backend("reference")
        cases.append(AttentionCase("reference guided (fp32 scores)", lambda: ref.cross(q, k, v, weight, coef, scale)))
    if "sdpa" in backends:
        sdpa = get_backend("sdpa")
        cases.append(AttentionCase("sdpa guided (bias mask)", lambda: sdpa.cross(q, k, v, weight, coef, scale)))
    if "triton" in backends:
        from cones2.kernels.triton_rectified import logit_std, rectified_cross_attention

        sd = logit_std(q, k, coef)
        cases += [
            AttentionCase("triton guided (total)", lambda: rectified_cross_attention(q, k, v, weight, coef, scale)),
            AttentionCase("  triton std pre-pass", lambda: logit_std(q, k, coef)),
            AttentionCase("  triton fused kernel",
                          lambda: rectified_cross_attention(q, k, v, weight, coef, scale, sd=sd)),
        ]
    if "cuda" in backends:
        from cones2.kernels import cuda_loader

        cases.append(AttentionCase("cuda twin guided", lambda: cuda_loader.rectified_cross_attention(
            q, k, v, weight, coef, scale)))
    return cases


def run_attention_benchmark(backends: list[str], device: torch.device, dtype: torch.dtype, warmup: int, repeat: int,
                            shapes=SD21_CROSS_ATTENTION, progress: bool = True) -> list[dict]:
    """Time every case on every shape; rows carry `ratio_vs_sdpa_plain` (min over min) and peak memory."""
    from tqdm.auto import tqdm

    rows = []
    for n, heads, dim in tqdm(shapes, desc="attention shapes", disable=not progress, leave=False):
        q, k, v, weight, coef = cfg_inputs(n, heads, dim, device, dtype)
        here = backends
        if "triton" in backends and device.type != "cuda" and n > INTERPRETER_MAX_N:
            here = [b for b in backends if b != "triton"]
            print(f"attention N={n}: triton skipped (CPU interpreter; only N <= {INTERPRETER_MAX_N} is timed)")
        baseline = None
        for case in attention_cases(q, k, v, weight, coef, here):
            timing = measure(case.fn, device, warmup, repeat)
            with PeakMemory(device) as mem:
                case.fn()
            baseline = baseline or timing["min_ms"]
            rows.append({"shape": f"B=2 H={heads} N={n} M={M_KEYS} d={dim}", "n": n, "heads": heads, "dim": dim,
                         "impl": case.name, **timing, "ratio_vs_sdpa_plain": timing["min_ms"] / baseline,
                         "peak_bytes": mem.peak})
        del q, k, v, weight, coef
    return rows
