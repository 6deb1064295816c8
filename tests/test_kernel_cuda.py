"""The CUDA twin (kernels/cuda, C ABI, ctypes loader): it builds with CMake wherever nvcc is, its
argument checks work without a GPU, and on a GPU it matches the SPEC 3 reference (and so does the
Triton kernel compiled for real, outside the interpreter)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402

from cones2.kernels.errors import KernelArgumentError, KernelUnavailableError  # noqa: E402
from cones2.kernels import cuda_loader  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
M = 77
# Evaluated before any fixture: without a device the gpu tests skip before the library is built.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def built_library(tmp_path_factory) -> Path:
    """libcones2_rca.so built from this checkout by CMake (about 10-20 s on 2 cores), or the one
    $CONES2_RCA_LIBRARY names (bench/gpu_check.sh builds it once with the same CMake files)."""
    given = os.environ.get("CONES2_RCA_LIBRARY")
    if given and Path(given).is_file():
        return Path(given)
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not found: the CUDA library is not built here"
        warnings.warn(reason)  # shown in pytest's warnings summary, even with -q
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("cuda-build")
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build)], ["cmake", "--build", str(build), "-j2"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    lib = build / "kernels" / "cuda" / cuda_loader.LIBRARY_NAME
    assert lib.is_file(), f"CMake did not produce {lib}"
    return lib


def test_library_builds_and_checks_arguments(built_library):
    lib = cuda_loader.load_library(built_library)
    assert lib.cones2_rca_abi_version() == cuda_loader.ABI_VERSION
    strides = cuda_loader.Strides()
    fake = ctypes.c_void_p(16)  # never dereferenced: argument checks come first
    call = lib.cones2_rectified_cross_attention
    assert call(0, fake, fake, fake, None, None, fake, 1, 1, 8, M, 200, 1.0, ctypes.byref(strides), None, None) == 1
    assert b"160" in lib.cones2_rca_last_error()
    assert call(0, fake, fake, fake, None, None, fake, 1, 1, 8, 300, 64, 1.0, ctypes.byref(strides), None, None) == 1
    assert b"256" in lib.cones2_rca_last_error()
    assert call(7, fake, fake, fake, None, None, fake, 1, 1, 8, M, 64, 1.0, ctypes.byref(strides), None, None) == 1
    assert b"dtype" in lib.cones2_rca_last_error()
    assert call(0, fake, fake, fake, fake, None, fake, 1, 1, 8, M, 64, 1.0, ctypes.byref(strides), fake, None) == 1
    assert b"coef" in lib.cones2_rca_last_error()


def test_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(KernelUnavailableError, match="make cuda") as err:
        cuda_loader.load_library(tmp_path / "nope.so")
    assert err.value.field == "cuda_library"


def test_launcher_checks_arguments_before_loading():
    """Bad tensors are a KernelArgumentError naming the argument, with or without the library."""
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(KernelArgumentError, match="CUDA tensor") as err:
        cuda_loader.rectified_cross_attention(q, q, q, None, None)
    assert err.value.field == "q"
    with pytest.raises(KernelArgumentError) as err:
        cuda_loader.rectified_cross_attention(q[0], q, q, None, None)
    assert err.value.field == "q"


def _layout_weight(n: int, negative: float) -> torch.Tensor:
    w = torch.zeros(n, M)
    w[:, 2] = negative
    w[: n // 3, 2] = 2.5
    w[:, 5] = negative
    w[-n // 3:, 5] = 2.5
    return w


def _spec(q, k, v, weight, coef):
    d = q.shape[-1]
    return torch.stack([ref.rectified_attention(q[b].double().cpu(), k[b].double().cpu(), v[b].double().cpu(),
                                                weight[b].double().cpu(), float(coef[b]), d ** -0.5)
                        for b in range(q.shape[0])])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
@pytest.mark.parametrize("d,N", [(40, 37), (64, 1000), (160, 133)])
def test_cuda_library_matches_spec(built_library, dtype, atol, d, N, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(cuda_loader, "_LIB", cuda_loader.load_library(built_library))
    B, H = 3, 2
    dev = torch.device("cuda")
    q, k, v = (torch.randn(B, H, n, d, device=dev).to(dtype) for n in (N, M, M))
    weight = torch.stack([_layout_weight(N, -1e4), _layout_weight(N, -1e8), _layout_weight(N, -1e8)]).to(dev)
    coef = torch.tensor([1e-5, 0.0, 0.8], device=dev)
    out = cuda_loader.rectified_cross_attention(q, k, v, weight, coef)
    torch.cuda.synchronize()
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), _spec(q, k, v, weight, coef), atol=atol, rtol=0)
    if d >= M:  # V = identity: the output is the probabilities; hard-masked ones exactly 0
        eye = torch.eye(M, d, device=dev).expand(B, H, M, d).to(dtype)
        probs = cuda_loader.rectified_cross_attention(q, k, eye, weight, coef)[..., :M]
        masked = ((weight <= -1e4) & (coef[:, None, None] > 0))[:, None].expand_as(probs)
        assert (probs[masked] == 0).all()


_TRITON_GPU_CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import spec_reference as ref
    from cones2.kernels.triton_rectified import rectified_cross_attention
    for dtype, atol in ((torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)):
        for d, N in ((40, 37), (64, 9216), (160, 133)):
            q, k, v = (torch.randn(2, 3, n, d, device="cuda").to(dtype) for n in (N, 77, 77))
            w = torch.zeros(2, N, 77, device="cuda"); w[:, : N // 2, 3] = 2.5; w[:, N // 2:, 3] = -1e8
            coef = torch.tensor([0.7, 0.0], device="cuda")
            out = rectified_cross_attention(q, k, v, w, coef)
            exp = torch.stack([ref.rectified_attention(q[b].double(), k[b].double(), v[b].double(), w[b].double(),
                                                       float(coef[b]), d ** -0.5) for b in range(2)])
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), exp, atol=atol, rtol=0)
    print("ok")
""")


@pytest.mark.gpu
@requires_cuda
def test_triton_kernel_compiled_on_gpu_matches_spec():
    """The conftest runs Triton under the interpreter; this compiles it for the GPU in a subprocess."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", _TRITON_GPU_CHECK.format(tests=str(REPO / "tests"))],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-4000:]


# ---- the `cuda` attention backend (engine/cones2/attention/cuda_backend.py) ----------------------
def _missing_library(monkeypatch, tmp_path):
    """The loader sees no library anywhere (and forgets any it opened)."""
    monkeypatch.setattr(cuda_loader, "_LIB", None)
    monkeypatch.setattr(cuda_loader, "library_candidates", lambda: [tmp_path / cuda_loader.LIBRARY_NAME])


def test_cuda_backend_is_registered_opt_in():
    from cones2 import backends

    spec = backends.get_spec("cuda")
    assert spec.kind == backends.ATTENTION and spec.exact and spec.default_on == ()
    assert "cuda" in backends.backend_names(backends.ATTENTION)
    why = backends.why_unavailable("cuda", "cpu")
    assert why is not None and "CUDA devices only" in why and "sdpa" in why


def test_cuda_backend_without_library_is_one_line_naming_the_build(monkeypatch, tmp_path):
    from cones2 import Cones2Error, select_backend

    _missing_library(monkeypatch, tmp_path)
    with pytest.raises(Cones2Error) as err:
        select_backend("cuda", "cuda")
    message = str(err.value)
    assert err.value.field == "backend" and "\n" not in message
    assert "libcones2_rca.so not found" in message and "make cuda" in message
    assert "cmake -S . -B build && cmake --build build" in message and "CONES2_RCA_LIBRARY" in message


def test_cuda_backend_is_usable_once_built(built_library, monkeypatch):
    """The library CMake built loads (no GPU needed): on a CUDA device the backend is available."""
    from cones2 import backends

    monkeypatch.setattr(cuda_loader, "_LIB", None)
    monkeypatch.setenv("CONES2_RCA_LIBRARY", str(built_library))
    assert backends.why_unavailable("cuda", "cuda") is None


def test_cuda_backend_translates_argument_errors():
    """Bad tensors reach the user as one Cones2Error naming the backend and the argument."""
    from cones2 import Cones2Error
    from cones2.attention.cuda_backend import CudaBackend

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(Cones2Error, match=r"^backend\.cuda: q: must be a 4-D CUDA tensor$") as err:
        CudaBackend().cross(q, q, q, torch.zeros(1, 8, 8), torch.ones(1), 0.25)
    assert err.value.field == "backend.cuda"


def test_cuda_backend_plain_is_softmax_attention():
    """Unguided calls never touch the library: plain softmax attention (SPEC 3 with coef 0)."""
    from cones2.attention.cuda_backend import CudaBackend

    q, k, v = torch.randn(1, 2, 9, 16, dtype=torch.float64), torch.randn(1, 2, 5, 16, dtype=torch.float64), \
        torch.randn(1, 2, 5, 16, dtype=torch.float64)
    expected = ref.rectified_attention(q[0], k[0], v[0], None, 0.0, 0.25)[None]
    torch.testing.assert_close(CudaBackend().plain(q, k, v, 0.25), expected)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_cuda_backend_matches_spec_on_gpu(built_library, dtype, atol, monkeypatch):
    """`--backend cuda` end to end at the attention seam: SD 2.1's largest cross-attention shape."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from cones2 import backends

    monkeypatch.setattr(cuda_loader, "_LIB", cuda_loader.load_library(built_library))
    assert backends.why_unavailable("cuda", "cuda") is None
    B, H, N, d = 2, 5, 9216, 64
    dev = torch.device("cuda")
    q, k, v = (torch.randn(B, H, n, d, device=dev).to(dtype) for n in (N, M, M))
    weight = torch.stack([_layout_weight(N, -1e8), _layout_weight(N, -1e8)]).to(dev)
    coef = torch.tensor([0.8, 0.0], device=dev)
    out = backends.attention_backend("cuda").cross(q, k, v, weight, coef, d ** -0.5)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double().cpu(), _spec(q, k, v, weight, coef), atol=atol, rtol=0)
