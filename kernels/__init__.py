"""Custom kernels (`cones2.kernels`): the fused Triton rectified cross-attention and its CUDA twin.

`rectified_cross_attention(q, k, v, weight, coef, scale=None)` is SPEC 3's rectified attention in
one fused Triton kernel (plus a light std pre-pass, `logit_std`); see `triton_rectified` for the
design, `tuning` for its bounded autotuning and `cuda_loader` for the CUDA C++ library with the
same contract. A leaf package: it imports torch, triton and the standard library only, and raises
its own `KernelArgumentError` (bad arguments) and `KernelUnavailableError` (a kernel cannot run
here), which the engine's attention seam translates. Triton is imported only when a kernel is used.
"""
from __future__ import annotations

from .errors import KernelArgumentError, KernelUnavailableError

_TRITON_NAMES = ("interpreting", "logit_std", "rectified_cross_attention")
__all__ = ["KernelArgumentError", "KernelUnavailableError", *_TRITON_NAMES]


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import triton_rectified

        return getattr(triton_rectified, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
