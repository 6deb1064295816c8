"""The `xformers` attention backend: a clear one-line error where it cannot run (this CPU), the
bias layout xformers needs, and (on a GPU with xformers) SPEC 3 numerics against `reference`."""
from __future__ import annotations

import pytest
import torch

import cones2
from cones2.attention import get_backend
from cones2.attention.xformers_backend import aligned_bias


def test_asking_for_xformers_where_it_cannot_run_is_one_line_naming_a_working_backend(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would make triton usable
    with pytest.raises(cones2.Cones2Error) as err:
        cones2.select_backend("cpu", "xformers")
    message = str(err.value)
    assert message.startswith("backend: 'xformers' cannot run on cpu: ") and "\n" not in message
    assert "use backend 'sdpa'" in message and message.endswith("usable here: onnx, onnxruntime, reference, sdpa")


def test_aligned_bias_pads_rows_to_a_multiple_of_8_and_keeps_values():
    bias = torch.randn(2, 1, 5, 77)
    out = aligned_bias(bias, heads=3)
    assert out.shape == (2, 3, 5, 77) and out.stride()[-2] == 80
    torch.testing.assert_close(out, bias.expand(2, 3, 5, 77), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_xformers_matches_reference_on_cuda(dtype, atol):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("xformers")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, N, M, d = 2, 5, 576, 77, 64
    q, k, v = (torch.randn(B, H, n, d, device="cuda", generator=g, dtype=dtype) for n in (N, M, M))
    weight = torch.zeros(B, N, M, device="cuda")
    weight[:, : N // 2, 3:5] = 2.5
    weight[:, N // 2 :, 3:5] = -1e8
    coef = torch.tensor([0.08 * 5.4, 0.0], device="cuda")
    want = get_backend("reference").cross(q, k, v, weight, coef, d ** -0.5).float()
    got = get_backend("xformers").cross(q, k, v, weight, coef, d ** -0.5).float()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    torch.testing.assert_close(get_backend("xformers").plain(q, k, v, d ** -0.5).float(),
                               get_backend("reference").plain(q, k, v, d ** -0.5).float(), rtol=0, atol=atol)
