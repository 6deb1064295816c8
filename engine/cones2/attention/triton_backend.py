"""The `triton` attention backend: guided cross-attention through the fused Triton kernel (SPEC 3).

Self-attention and unguided calls (`plain`) stay on torch SDPA (flash / memory-efficient kernels
are already the fastest thing there); only `cross` with a rectification runs
`cones2.kernels.rectified_cross_attention`, which never materialises scores or a bias tensor.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it). This is
the seam where the kernels' own argument errors become the engine's `Cones2Error`.
"""
from __future__ import annotations

import torch

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, missing_package, register
from .fused import FusedKernelBackend


def triton_unavailable(device: torch.device) -> str | None:
    """None when the fused kernel can run on `device`, else why not."""
    why = missing_package("triton", "pip install 'cones2-engine[triton]'")
    if why is not None:
        return why
    from cones2.kernels.triton_rectified import interpreting

    if device.type != "cuda" and not interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)"
    return None


class TritonBackend(FusedKernelBackend):
    """Attention backend `triton` (build it through `cones2.backends`, which checks it can run)."""

    name = "triton"

    @staticmethod
    def kernel():
        from cones2.kernels import triton_rectified

        return triton_rectified.rectified_cross_attention


register(BackendSpec("triton", ATTENTION, TritonBackend,
                     "fused Triton kernel for guided cross-attention, SDPA elsewhere",
                     unavailable=triton_unavailable, default_on=("cuda",), priority=20, fallback=BASE_ATTENTION))
