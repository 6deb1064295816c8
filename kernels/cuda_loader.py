"""ctypes loader for the CUDA twin (`kernels/cuda/`, built by CMake into libcones2_rca.so).

Same contract as `cones2.kernels.rectified_cross_attention`, without Triton: for services that
ship a prebuilt library. Build it with `make cuda` (or `cmake -S . -B build && cmake --build
build`); the loader looks in $CONES2_RCA_LIBRARY, then build/kernels/cuda/ under the repository.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .errors import KernelArgumentError, KernelUnavailableError

LIBRARY_NAME = "libcones2_rca.so"
ABI_VERSION = 1
MAX_HEAD_DIM, MAX_KEYS = 160, 256
BUILD_COMMAND = "cmake -S . -B build && cmake --build build"   # what `make cuda` runs
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Strides(ctypes.Structure):
    """cones2_rca_strides: element strides of q, k, v, out (4 each) and weight (3)."""

    _fields_ = [("q", ctypes.c_int64 * 4), ("k", ctypes.c_int64 * 4), ("v", ctypes.c_int64 * 4),
                ("out", ctypes.c_int64 * 4), ("weight", ctypes.c_int64 * 3)]


def library_candidates() -> list[Path]:
    """Where the library is looked for, in order."""
    found = [Path(os.environ["CONES2_RCA_LIBRARY"])] if os.environ.get("CONES2_RCA_LIBRARY") else []
    repo = Path(__file__).resolve().parent.parent
    return found + [repo / "build" / "kernels" / "cuda" / LIBRARY_NAME, Path(__file__).resolve().parent / LIBRARY_NAME]


_LIB: ctypes.CDLL | None = None


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Open (once) and type the library; KernelUnavailableError if it is missing or of another ABI."""
    global _LIB
    if _LIB is not None and path is None:
        return _LIB
    paths = [Path(path)] if path is not None else library_candidates()
    target = next((p for p in paths if p.is_file()), None)
    if target is None:
        raise KernelUnavailableError(f"{LIBRARY_NAME} not found (looked in {', '.join(map(str, paths))}); build it with "
                                     f"`make cuda` (`{BUILD_COMMAND}`) or set CONES2_RCA_LIBRARY", "cuda_library")
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelUnavailableError(f"cannot load {target}: {exc}", "cuda_library") from None
    lib.cones2_rca_abi_version.restype = ctypes.c_int
    if lib.cones2_rca_abi_version() != ABI_VERSION:
        raise KernelUnavailableError(f"{target} has ABI {lib.cones2_rca_abi_version()}, this loader needs {ABI_VERSION}",
                          "cuda_library")
    lib.cones2_rca_last_error.restype = ctypes.c_char_p
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.cones2_rectified_cross_attention.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32,
                                                     ctypes.c_float, ctypes.POINTER(Strides), ptr, ptr]
    lib.cones2_rectified_cross_attention.restype = i32
    if path is None:
        _LIB = lib
    return lib


def rectified_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None,
                              coef: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """SPEC 3 rectified attention by the CUDA library; same arguments and result as the Triton kernel.

    q: (B, H, N, d), k/v: (B, H, M, d) CUDA tensors (float32/16, bfloat16; d <= 160, M <= 256);
    weight: (B, N, M) float32 or None; coef: (B,) float32. Runs on the current torch stream.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_cuda:
            raise KernelArgumentError("must be a 4-D CUDA tensor", name)
        if t.dtype != q.dtype or t.device != q.device:
            raise KernelArgumentError("must match q's dtype and device", name)
    if q.dtype not in _DTYPE_CODES:
        raise KernelArgumentError(f"dtype {q.dtype} is not supported (float32, float16, bfloat16)", "q")
    B, H, N, d = q.shape
    M = k.shape[2]
    if k.shape != (B, H, M, d) or v.shape != k.shape:
        raise KernelArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be ({B}, {H}, M, {d})", "k")
    if d > MAX_HEAD_DIM or M > MAX_KEYS:
        raise KernelArgumentError(f"d={d}, M={M}: the CUDA kernel takes d <= {MAX_HEAD_DIM} and M <= {MAX_KEYS}", "q")
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if N == 0:
        return out
    if weight is not None:
        if weight.shape != (B, N, M):
            raise KernelArgumentError(f"shape {tuple(weight.shape)} must be ({B}, {N}, {M})", "weight")
        if coef is None or tuple(torch.as_tensor(coef).shape) != (B,):
            raise KernelArgumentError(f"must be a ({B},) tensor when a weight is given", "coef")
        weight = weight.to(device=q.device, dtype=torch.float32)
        coef = torch.as_tensor(coef, dtype=torch.float32, device=q.device).contiguous()
    strides = Strides((ctypes.c_int64 * 4)(*q.stride()), (ctypes.c_int64 * 4)(*k.stride()),
                      (ctypes.c_int64 * 4)(*v.stride()), (ctypes.c_int64 * 4)(*out.stride()),
                      (ctypes.c_int64 * 3)(*(weight.stride() if weight is not None else (0, 0, 0))))
    moments = torch.empty(2 * B, dtype=torch.float64, device=q.device)
    lib = load_library()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        rc = lib.cones2_rectified_cross_attention(
            _DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
            weight.data_ptr() if weight is not None else None, coef.data_ptr() if weight is not None else None,
            out.data_ptr(), B, H, N, M, d, float(d ** -0.5 if scale is None else scale), ctypes.byref(strides),
            moments.data_ptr(), stream)
    if rc != 0:
        raise KernelUnavailableError(f"CUDA kernel failed ({rc}): {lib.cones2_rca_last_error().decode()}", "cuda_library")
    return out
