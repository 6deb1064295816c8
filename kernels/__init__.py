"""Custom kernels (`cones2.kernels`): the fused Triton rectified cross-attention and its CUDA twin.

`rectified_cross_attention(q, k, v, weight, coef, scale=None)` is SPEC 3's rectified attention in
one fused Triton kernel (plus a light std pre-pass, `logit_std`); see `triton_rectified` for the
design and `cuda_loader` for the CUDA C++ library with the same contract. Importing this package
needs Triton only when these names are used.
"""
from __future__ import annotations

__all__ = ["logit_std", "rectified_cross_attention"]


def __getattr__(name: str):
    if name in __all__:
        from . import triton_rectified

        return getattr(triton_rectified, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
