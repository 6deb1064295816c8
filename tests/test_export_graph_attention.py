"""The exportable `onnx` attention backend and the UNet wrapper's level routing, against the
independent SPEC reference (tests/spec_reference.py) and the UNet's own shapes. Fast, no export."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402

from cones2.export.graph_attention import GraphAttention  # noqa: E402
from cones2.export.unet_wrapper import (  # noqa: E402
    UNetExportWrapper, cross_attention_levels, processor_levels, routed_by_level)


def _inputs(B=3, H=2, N=12, M=77, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (N, M, M))
    weight = torch.zeros(B, N, M)
    inside = torch.rand(B, N, generator=g) < 0.5
    weight[:, :, 3] = torch.where(inside, 2.5, -1e8)          # subject token: strength / hard mask
    weight[:, :, 5] = torch.where(~inside, 1.0, -5e7)         # boundary-blend style value, still a hard mask
    coef = torch.tensor([0.4, 0.0, 0.1])[:B]                  # guided, unguided, weakly guided
    return q, k, v, weight, coef


def test_graph_attention_matches_spec_reference():
    q, k, v, weight, coef = _inputs()
    scale = q.shape[-1] ** -0.5
    got = GraphAttention().cross(q, k, v, weight, coef, scale)
    for b in range(q.shape[0]):
        w = weight[b] if coef[b] > 0 else None
        want = ref.rectified_attention(q[b], k[b], v[b], w, float(coef[b]), scale)
        torch.testing.assert_close(got[b], want, atol=2e-6, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_graph_attention_hard_mask_is_exact_zero_probability():
    """Values behind a hard mask must not leak: change them, the output must not move."""
    q, k, v, weight, coef = _inputs(B=1)
    weight[:, :, 7] = -1e8                                        # a token masked for every pixel
    scale = q.shape[-1] ** -0.5
    masked_tokens = (weight[0] <= -1e4).all(dim=0)
    v2 = v.clone()
    v2[:, :, masked_tokens] += 1000.0
    a = GraphAttention().cross(q, k, v, weight, coef, scale)
    b = GraphAttention().cross(q, k, v2, weight, coef, scale)
    assert masked_tokens.sum() == 1
    assert torch.equal(a, b)
    b_unmasked = GraphAttention().cross(q, k, v2, weight, torch.zeros(1), scale)   # coef 0: no mask
    assert not torch.allclose(b_unmasked, a)


def test_graph_attention_plain_is_softmax_attention():
    q, k, v, _, _ = _inputs()
    scale = 0.3
    want = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    torch.testing.assert_close(GraphAttention().plain(q, k, v, scale), want, atol=1e-6, rtol=1e-5)


def test_processor_levels_match_the_query_counts_the_unet_really_uses(tiny_engine):
    """Each attention layer's level (from block names) must be where its N really is, at a
    non-square size where every level's N is distinct."""
    unet = tiny_engine.unet
    height, width = 64, 128
    seen = {}
    hooks = []
    for name, module in unet.named_modules():
        if hasattr(module, "processor"):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kw, name=name: seen.__setitem__(name + ".processor", args[0].shape[1]), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, height // 8, width // 8), 10.0, encoder_hidden_states=torch.randn(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    shapes = ref.level_sizes_for(unet, height, width)
    levels = processor_levels(unet)
    assert set(levels) == set(seen)
    for name, level in levels.items():
        assert seen[name] == shapes[level][0] * shapes[level][1], name
    assert cross_attention_levels(unet) == [0, 1, 2]


def test_wrapper_with_reference_backend_matches_the_engine_runner(tiny_engine):
    """The export wrapper (level-routed weights) computes what the engine's PyTorch runner computes
    with N-keyed weights, for a batch mixing guided and unguided rows; processors are restored."""
    unet = tiny_engine.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(3)
    sample, ehs = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    shapes = tiny_engine.level_shapes(64, 128)
    weights = [torch.where(torch.rand(2, h * w, 77, generator=g) < 0.5, 2.5, -1e8) for h, w in shapes]
    coef = torch.tensor([0.3, 0.0])
    t = torch.tensor([500.0, 500.0])
    wrapper = UNetExportWrapper(unet, [0, 1, 2], backend="reference")
    with routed_by_level(unet), torch.no_grad():
        got = wrapper(sample, t, ehs, coef, *weights)
    from cones2.attention import Rectification

    want = tiny_engine.runner("reference")(sample, t[0], ehs, Rectification(
        {h * w: wt for (h, w), wt in zip(shapes, weights)}, coef))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


@pytest.mark.parametrize("B,N", [(1, 5), (2, 64)])
def test_graph_attention_unguided_rows_equal_plain_attention(B, N):
    q, k, v, weight, _ = _inputs(B=B, N=N)
    coef = torch.zeros(B)
    scale = q.shape[-1] ** -0.5
    torch.testing.assert_close(GraphAttention().cross(q, k, v, weight, coef, scale),
                               GraphAttention().plain(q, k, v, scale), atol=2e-6, rtol=1e-5)
