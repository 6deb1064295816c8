"""The engine's attention backends against the literal SPEC 3 formula (tests/spec_reference.py)."""
from __future__ import annotations

import pytest
import torch

import spec_reference as spec
from cones2.attention import get_backend, logit_std


def _inputs(B=3, H=2, N=45, M=77, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (N, M, M))
    weight = torch.zeros(B, N, M)
    inside = torch.rand(N, generator=g) < 0.4
    for b in range(B):  # subject tokens 2 and 5: +2.5 inside its region, -1e8 outside, a blend row
        weight[b, :, 2] = torch.where(inside, 2.5, -1e8)
        weight[b, :, 5] = torch.where(~inside, 3.0, -1e8)
    weight[:, 0, 5] = -5e7
    coef = torch.tensor([0.3, 0.0, 0.05])[:B]  # guided, unguided (CFG's other half), weakly guided
    return q.to(dtype), k.to(dtype), v.to(dtype), weight, coef


def _reference(q, k, v, weight, coef, scale):
    return torch.stack([spec.rectified_attention(q[b].float(), k[b].float(), v[b].float(), weight[b], float(coef[b]), scale)
                        for b in range(q.shape[0])])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("d", [16, 40, 64])
def test_cross_matches_spec_fp32(backend, d):
    q, k, v, weight, coef = _inputs(d=d, seed=d)
    scale = d ** -0.5
    out = get_backend(backend).cross(q, k, v, weight, coef, scale)
    torch.testing.assert_close(out, _reference(q, k, v, weight, coef, scale), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_plain_matches_unrectified(backend):
    q, k, v, _, _ = _inputs(B=2)
    out = get_backend(backend).plain(q, k, v, 0.25)
    ref = torch.stack([spec.rectified_attention(q[b], k[b], v[b], None, 0.0, 0.25) for b in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_soft_mask_matches_spec(backend):
    """A finite w- (the soft mask of docs/layout.md) is SPEC 3's literal formula, and unlike -1e8 it
    leaves the masked keys some probability."""
    q, k, v, hard, coef = _inputs(seed=3)
    soft = torch.where(hard <= -1e4, torch.tensor(-2.0), hard)
    impl = get_backend(backend)
    out = impl.cross(q, k, v, soft, coef, 0.25)
    torch.testing.assert_close(out, _reference(q, k, v, soft, coef, 0.25), rtol=1e-5, atol=2e-6)
    masked = impl.cross(q, k, v, hard, coef, 0.25)
    assert (out[0] - masked[0]).abs().max() > 1e-3          # guided: the soft mask is not the hard one
    torch.testing.assert_close(out[1], masked[1])            # coef 0: both are plain attention


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_mask_is_exact_and_finite(backend, dtype):
    """Masked keys get probability exactly 0: a huge value on masked keys never leaks into the output."""
    q, k, v, weight, coef = _inputs(B=1, dtype=dtype)
    coef = torch.tensor([0.5])
    weight[0, :, 7] = -1e8                      # key 7 masked for every pixel
    v = v.clone()
    v[0, :, 7] = 1e4                            # would dominate any row that gave it weight
    out = get_backend(backend).cross(q, k, v, weight, coef, 0.25)
    assert torch.isfinite(out).all()
    assert out.float().abs().max() < 100, "a masked key leaked into the output"


def test_closed_form_std_matches_torch_std():
    q, k, _, _, _ = _inputs(B=2, N=70, d=64)
    q = q + 0.7  # a non-zero mean stresses the E[S^2] - E[S]^2 cancellation
    s = q @ k.transpose(-1, -2)
    torch.testing.assert_close(logit_std(q, k), s.flatten(1).std(dim=1), rtol=1e-5, atol=0)
