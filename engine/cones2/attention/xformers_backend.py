"""The `xformers` attention backend: every attention call through
`xformers.ops.memory_efficient_attention`, the SPEC 3 rectification folded into its additive bias.

The bias is the `sdpa` backend's (`rectification_bias`: coef * sd * scale * W with the exact
per-sample std of SPEC 3, -inf on hard masks), expanded over heads. xformers wants (B, N, H, d)
inputs and a bias whose last dimension is stored with a stride that is a multiple of 8, so the 77
keys live in an 80-wide buffer. Imported lazily: registering it costs nothing where xformers is
missing, and asking for it there is a one-line error naming a backend that works.
"""
from __future__ import annotations

import torch

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, missing_package, register
from .backends import rectification_bias

BIAS_ALIGN = 8


def xformers_unavailable(device: torch.device) -> str | None:
    """None when xformers can run on `device`, else why not (and what to use instead)."""
    why = missing_package("xformers", "pip install 'cones2-engine[xformers]' with a matching torch build; "
                                      "or use backend 'sdpa'")
    if why is not None:
        return why
    if device.type != "cuda":
        return "xformers' memory-efficient kernels run on CUDA only; use backend 'sdpa' here"
    return None


def aligned_bias(bias: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 1, N, M) -> (B, H, N, M) view of a buffer whose rows are padded to a multiple of 8."""
    B, _, N, M = bias.shape
    padded = -(-M // BIAS_ALIGN) * BIAS_ALIGN
    buffer = bias.new_zeros(B, heads, N, padded)
    buffer[..., :M] = bias
    return buffer[..., :M]


class XformersBackend:
    """Attention backend `xformers`: q (B, H, N, d), k/v (B, H, M, d) in and out, like the others."""

    name = "xformers"

    def __init__(self):
        import xformers.ops

        self._attention = xformers.ops.memory_efficient_attention

    def plain(self, q, k, v, scale):
        out = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    def cross(self, q, k, v, weight, coef, scale):
        """SPEC 3 rectified attention; weight (B, N, M) float32, coef (B,) float32."""
        bias = aligned_bias(rectification_bias(q, k, weight, coef, scale), q.shape[1])
        out = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)


register(BackendSpec("xformers", ATTENTION, XformersBackend,
                     "xformers memory-efficient attention, rectification as its additive bias (CUDA)",
                     unavailable=xformers_unavailable, fallback=BASE_ATTENTION))
