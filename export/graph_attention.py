"""The `onnx` attention backend: SPEC 3 rectified attention written so that it exports to ONNX and
builds in TensorRT.

The `sdpa` backend computes the per-sample logit std from a closed form finished in float64, which
TensorRT cannot express and ONNX Runtime would run slowly. Here everything stays float32 and the
std is materialised: S = Q K^T in fp32, sd = torch.std(S) over (heads, queries, keys) per sample,
the two-pass formula ONNX `ReduceMean`s give, with no cancellation to guard against. The score
matrix (B, H, N, 77) is small for cross-attention (77 keys), so materialising it costs little
next to the UNet's convolutions. The hard mask is `where(hard_mask(weight, coef), -inf, .)`
(`cones2.kernels.reference`, SPEC 3's rule), exact in every precision. Plain attention stays `scaled_dot_product_attention`, which the
exporter writes as MatMul-Softmax-MatMul that TensorRT's attention fusion recognises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cones2.kernels.reference import hard_mask

NAME = "onnx"


class GraphAttention:
    """Exportable attention: q (B, H, N, d), k/v (B, H, M, d), weight (B, N, M) fp32, coef (B,) fp32."""

    name = NAME

    def plain(self, q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        scores = q.float() @ k.float().transpose(-1, -2)                         # (B, H, N, M) fp32
        sd = scores.std(dim=(1, 2, 3))                                            # (B,) unbiased
        factor = (coef * sd * scale)[:, None, None, None]                        # (B, 1, 1, 1)
        logits = scores * scale + factor * weight[:, None]                        # (B, H, N, M)
        logits = torch.where(hard_mask(weight, coef)[:, None], float("-inf"), logits)
        return (torch.softmax(logits, dim=-1) @ v.float()).to(q.dtype)


