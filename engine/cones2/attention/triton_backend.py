"""The `triton` attention backend: guided cross-attention through the fused Triton kernel (SPEC 3).

Self-attention and unguided calls (`plain`) stay on torch SDPA (flash / memory-efficient kernels
are already the fastest thing there); only `cross` with a rectification runs
`cones2.kernels.rectified_cross_attention`, which never materialises scores or a bias tensor.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it). This is
the seam where the kernels' own argument errors become the engine's `Cones2Error`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, missing_package, register
from ..errors import Cones2Error


def triton_unavailable(device: torch.device) -> str | None:
    """None when the fused kernel can run on `device`, else why not."""
    why = missing_package("triton", "pip install 'cones2-engine[triton]'")
    if why is not None:
        return why
    from cones2.kernels.triton_rectified import interpreting

    if device.type != "cuda" and not interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)"
    return None


class TritonBackend:
    """Attention backend `triton` (build it through `cones2.backends`, which checks it can run)."""

    name = "triton"

    def __init__(self):
        from cones2.kernels.errors import KernelArgumentError
        from cones2.kernels import triton_rectified

        self._kernel = triton_rectified.rectified_cross_attention
        self._argument_error = KernelArgumentError

    def plain(self, q, k, v, scale):
        """q: (B, H, N, d), k/v: (B, H, M, d) -> softmax(q k^T * scale) v via SDPA."""
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        """SPEC 3 rectified attention; weight (B, N, M) float32, coef (B,) float32."""
        try:
            return self._kernel(q, k, v, weight, coef, scale)
        except self._argument_error as exc:
            raise Cones2Error(str(exc), "backend.triton") from None


register(BackendSpec("triton", ATTENTION, TritonBackend,
                     "fused Triton kernel for guided cross-attention, SDPA elsewhere",
                     unavailable=triton_unavailable, default_on=("cuda",), priority=20, fallback=BASE_ATTENTION))
