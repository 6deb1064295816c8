"""SPEC 3's rectified cross-attention written literally: the yardstick of every implementation of
the kernel (docs/math.md section 3).

A leaf: torch and the standard library only, nothing of the project. The fused Triton kernel's and
the CUDA twin's checks, the numerics benchmark (`bench/kernel_numerics.py`), the engine's
`reference` attention backend (in fp32, bit for bit what paper-exact has always computed) and the
ONNX graph check (`cones2.export.verify`, through that backend) all read this one formula and this
one `HARD_MASK`. `tests/spec_reference.py` stays a separate, independent implementation.
"""
from __future__ import annotations

import torch

# A weight at or below this, in a guided sample (coef > 0), is a hard mask: probability exactly 0.
HARD_MASK = -1e4


def hard_mask(weight: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(B, N, M) bool: where SPEC 3 masks hard (W <= HARD_MASK in a sample with coef > 0)."""
    return (weight <= HARD_MASK) & (coef[:, None, None] > 0)


def rectified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                        coef: torch.Tensor, scale: float,
                        dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 3 per sample, every tensor cast to `dtype` first (float64 by default: the yardstick).

    q (B, H, N, d), k/v (B, H, M, d), weight (B, N, M), coef (B,) = g log(1 + sigma^2) (0: plain).
    S = Q K^T; sd = unbiased std of S over (heads, queries, keys); logits (S + coef W sd) * scale,
    -inf where `hard_mask`; softmax over keys; times V. Returns (output (B, H, N, d), sd (B,)),
    both in `dtype`; the scores are materialised (this is the slow, literal form)."""
    q, k, v, weight, coef = (t.to(dtype) for t in (q, k, v, weight, coef))
    scores = q @ k.transpose(-1, -2)                                               # (B, H, N, M)
    sd = scores.flatten(1).std(dim=1)                                              # (B,), unbiased
    rectified = scores + coef[:, None, None, None] * weight[:, None] * sd[:, None, None, None]
    logits = (rectified * scale).masked_fill(hard_mask(weight, coef)[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v, sd
