"""The `cuda` attention backend: guided cross-attention through the CUDA twin of the fused kernel.

The twin (`kernels/cuda/`, a shared library with a C ABI, reached through
`cones2.kernels.cuda_loader`) computes the same SPEC 3 contract as the Triton kernel without
Triton's JIT: nothing compiles at run time. Self-attention and unguided calls stay on torch SDPA,
as in the `triton` backend. The library is built by CMake (`make cuda`); where it is missing,
asking for this backend is one line naming that command. Opt-in (never a default) until
`make gpu-check` has verified its numerics on the GPU in question.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, register
from ..errors import Cones2Error

def library_unavailable() -> str | None:
    """None when libcones2_rca.so loads here (no GPU needed for that), else why not and how to build it."""
    from cones2.kernels import cuda_loader
    from cones2.kernels.errors import KernelUnavailableError

    try:
        cuda_loader.load_library()
    except KernelUnavailableError as exc:
        return str(exc).removeprefix("cuda_library: ")
    return None


def cuda_unavailable(device: torch.device) -> str | None:
    """None when the CUDA twin can run on `device`, else why not."""
    if device.type != "cuda":
        return "the CUDA twin runs on CUDA devices only; use backend 'sdpa' here"
    return library_unavailable()


class CudaBackend:
    """Attention backend `cuda` (build it through `cones2.backends`, which checks it can run)."""

    name = "cuda"

    def __init__(self):
        from cones2.kernels import cuda_loader
        from cones2.kernels.errors import KernelArgumentError

        self._kernel = cuda_loader.rectified_cross_attention
        self._argument_error = KernelArgumentError

    def plain(self, q, k, v, scale):
        """q: (B, H, N, d), k/v: (B, H, M, d) -> softmax(q k^T * scale) v via SDPA."""
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        """SPEC 3 rectified attention; weight (B, N, M) float32, coef (B,) float32."""
        try:
            return self._kernel(q, k, v, weight, coef, scale)
        except self._argument_error as exc:   # bad input; a failed launch stays a KernelUnavailableError
            raise Cones2Error(str(exc), "backend.cuda") from None


register(BackendSpec("cuda", ATTENTION, CudaBackend,
                     "CUDA twin of the fused kernel (libcones2_rca.so, built by CMake) for guided "
                     "cross-attention, SDPA elsewhere", unavailable=cuda_unavailable, fallback=BASE_ATTENTION))
