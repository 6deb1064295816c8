"""The `triton` attention backend: guided cross-attention through the fused Triton kernel (SPEC 3).

Self-attention and unguided calls (`plain`) stay on torch SDPA (flash / memory-efficient kernels
are already the fastest thing there); only `cross` with a rectification runs
`cones2.kernels.rectified_cross_attention`, which never materialises scores or a bias tensor.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import Cones2Error


class TritonBackend:
    """Attention backend `triton`; building it fails with a clear Cones2Error where it cannot run."""

    name = "triton"

    def __init__(self):
        try:
            from cones2.kernels import triton_rectified
        except ImportError as exc:
            raise Cones2Error(f"the triton backend needs the `triton` package ({exc}); "
                              "pip install 'cones2-engine[triton]' or use backend='sdpa'", "backend") from None
        if not torch.cuda.is_available() and not triton_rectified.interpreting():
            raise Cones2Error("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run Triton's CPU "
                              "interpreter, slowly); on the CPU use backend='sdpa'", "backend")
        self._kernel = triton_rectified.rectified_cross_attention

    def plain(self, q, k, v, scale):
        """q: (B, H, N, d), k/v: (B, H, M, d) -> softmax(q k^T * scale) v via SDPA."""
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        """SPEC 3 rectified attention; weight (B, N, M) float32, coef (B,) float32."""
        return self._kernel(q, k, v, weight, coef, scale)
