"""Attention backends behind one seam, and the registry that picks one by name.

Every backend computes, for q (B, H, N, d) and k, v (B, H, M, d):
  plain(q, k, v, scale)                      softmax(q k^T * scale) v
  cross(q, k, v, weight, coef, scale)        SPEC 3 rectified attention, weight (B, N, M) float32,
                                             coef (B,) float32; weight <= -1e4 with coef > 0 is a
                                             hard mask (probability exactly 0).
`reference` is SPEC 3 written literally (`cones2.kernels.reference` in fp32, scores materialised);
every other backend is tested against it. Each backend registers itself in `cones2.backends`; the sampler never branches on names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cones2.kernels.reference import hard_mask, rectified_attention

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, register
from .stats import logit_std


class ReferenceBackend:
    """Plain PyTorch, literally SPEC 3: scores materialised in fp32, torch.std over the sample."""

    name = "reference"

    def plain(self, q, k, v, scale):
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
        return (probs @ v.float()).to(q.dtype)

    def cross(self, q, k, v, weight, coef, scale):
        return rectified_attention(q, k, v, weight, coef, scale, torch.float32)[0].to(q.dtype)


class SdpaBackend:
    """torch SDPA; the rectification folded into a float additive mask (B, 1, N, M).

    softmax((S + c W sd) * scale) = softmax(S * scale + c sd scale W): the bias is per sample and
    shared by all heads, and the std comes from the closed form in `stats`, so no score matrix
    is materialised outside SDPA itself.
    """

    name = "sdpa"

    def plain(self, q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rectification_bias(q, k, weight, coef, scale), scale=scale)


def rectification_bias(q, k, weight, coef, scale) -> torch.Tensor:
    """Additive logit bias (B, 1, N, M) in q's dtype: coef * sd * scale * W, -inf on hard masks."""
    sd = logit_std(q, k)
    factor = (coef * sd * scale)[:, None, None]
    bias = factor * weight
    bias = bias.masked_fill(hard_mask(weight, coef), float("-inf"))
    return bias[:, None].to(q.dtype)


register(BackendSpec("reference", ATTENTION, ReferenceBackend,
                     "SPEC 3 literally: fp32 scores materialised, torch.std (slow; the yardstick)", traceable=True))
register(BackendSpec(BASE_ATTENTION, ATTENTION, SdpaBackend,
                     "torch SDPA with the rectification folded into an additive mask, closed-form std",
                     default_on=("cpu", "cuda", "mps"), priority=10, traceable=True))
