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

from ..backends import ATTENTION, BASE_ATTENTION, BackendSpec, register
from .fused import FusedKernelBackend


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


class CudaBackend(FusedKernelBackend):
    """Attention backend `cuda` (build it through `cones2.backends`, which checks it can run)."""

    name = "cuda"

    @staticmethod
    def kernel():
        from cones2.kernels import cuda_loader

        return cuda_loader.rectified_cross_attention


register(BackendSpec("cuda", ATTENTION, CudaBackend,
                     "CUDA twin of the fused kernel (libcones2_rca.so, built by CMake) for guided "
                     "cross-attention, SDPA elsewhere", unavailable=cuda_unavailable, fallback=BASE_ATTENTION))
