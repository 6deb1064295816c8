"""The fused Triton rectified cross-attention (cones2.kernels) against the plain-PyTorch SPEC 3
reference in tests/spec_reference.py, on the CPU under TRITON_INTERPRET=1 (tiny shapes), and its
bounded autotuning (keys and configs counted for every SD 1.x/2.x shape, no launch needed).
With CI=true a missing Triton fails instead of skipping."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402

from ci_support import import_or_skip  # noqa: E402

import_or_skip("triton", "triton is not installed")
from cones2.kernels.errors import KernelArgumentError  # noqa: E402
from cones2.kernels.triton_rectified import logit_std, rectified_cross_attention  # noqa: E402
from cones2.kernels import triton_rectified, tuning  # noqa: E402

torch.set_num_threads(1)
M = 77
SUBJECT_A, SUBJECT_B = (2, 3), (5,)


def layout_weight(n: int, m: int = M, *, negative: float = -1e8, seed: int = 0) -> torch.Tensor:
    """W (n, m) like SPEC 3 builds it: subject A's tokens get +2.5 in the first rows and the negative
    weight elsewhere, subject B the same on the last rows, a boundary blend of -5e7; others 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(n, m)
    split = n // 3 + int(torch.randint(0, 3, (1,), generator=g))
    for tok in SUBJECT_A:
        w[:, tok] = negative
        w[:split, tok] = 2.5
    for tok in SUBJECT_B:
        w[:, tok] = negative
        w[n - split:, tok] = 2.5
    w[split, SUBJECT_B[0]] = negative / 2          # a bilinear boundary blend: still a hard mask
    return w


def inputs(B, H, N, d, dtype=torch.float32, mean=0.0):
    q = (torch.randn(B, H, N, d) + mean).to(dtype)
    k = (torch.randn(B, H, M, d) + mean).to(dtype)
    v = torch.randn(B, H, M, d).to(dtype)
    return q, k, v


def spec(q, k, v, weight, coef, scale=None):
    """Per-sample SPEC 3 reference in float64 from the (already rounded) inputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for b in range(q.shape[0]):
        w = None if weight is None else weight[b].double()
        outs.append(ref.rectified_attention(q[b].double(), k[b].double(), v[b].double(), w, float(coef[b]), scale))
    return torch.stack(outs)


@pytest.mark.parametrize("d,N", [(40, 37), (64, 70), (80, 37), (128, 70), (160, 37)])
def test_fp32_matches_spec(d, N):
    B, H = 3, 2
    q, k, v = inputs(B, H, N, d)
    weight = torch.stack([layout_weight(N, seed=s) for s in range(B)])
    coef = torch.tensor([0.35, 0.0, 0.9])            # coef 0: plain attention despite its -1e8 weights
    out = rectified_cross_attention(q, k, v, weight, coef)
    assert out.shape == q.shape and out.dtype == torch.float32
    expected = spec(q, k, v, weight, coef)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    plain = spec(q[1:2], k[1:2], v[1:2], None, [0.0])
    torch.testing.assert_close(out[1:2].double(), plain, atol=2e-5, rtol=1e-5)
    # the guidance really changed the guided samples (the test could fail)
    assert (expected[0] - spec(q[:1], k[:1], v[:1], None, [0.0])[0]).abs().max() > 0.1


def test_soft_mask_matches_spec():
    """A finite w- (docs/layout.md's soft mask) takes the literal path: SPEC 3's formula, not a hard mask."""
    B, H, N, d = 2, 2, 37, 40
    q, k, v = inputs(B, H, N, d)
    soft = torch.stack([layout_weight(N, negative=-20.0, seed=s) for s in range(B)])
    coef = torch.tensor([0.35, 0.9])
    out = rectified_cross_attention(q, k, v, soft, coef)
    torch.testing.assert_close(out.double(), spec(q, k, v, soft, coef), atol=2e-5, rtol=1e-5)
    hard = spec(q, k, v, torch.stack([layout_weight(N, seed=s) for s in range(B)]), coef)
    assert (out.double() - hard).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("d,N,m", [(96, 301, 77), (160, 133, 77), (64, 150, 256), (40, 65, 200)])
def test_fp32_matches_spec_more_shapes(d, N, m):
    B, H = 2, 3
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, m, d), torch.randn(B, H, m, d)
    weight = torch.stack([layout_weight(N, m, seed=s) for s in range(B)])
    coef = torch.tensor([0.6, 0.0])
    out = rectified_cross_attention(q, k, v, weight, coef)
    torch.testing.assert_close(out.double(), spec(q, k, v, weight, coef), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_low_precision_bounded_error(dtype, atol):
    B, H, N, d = 2, 2, 70, 64
    q, k, v = inputs(B, H, N, d, dtype)
    weight = torch.stack([layout_weight(N, seed=s) for s in range(B)])
    coef = torch.tensor([0.7, 0.0])
    out = rectified_cross_attention(q, k, v, weight, coef)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), spec(q, k, v, weight, coef), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hard_mask_probabilities_are_exactly_zero(dtype):
    """With V = identity (d >= M) the output rows are the attention probabilities themselves."""
    B, H, N, d = 2, 1, 37, 128
    q, k, _ = inputs(B, H, N, d, dtype)
    q = q * 3  # large logits
    v = torch.eye(M, d).expand(B, H, M, d).to(dtype)
    # sample 0: weights right at the threshold and a tiny coef, where the literal product alone
    # would leave probabilities far from 0; sample 1: SPEC's default -1e8 at a large coef.
    weight = torch.stack([layout_weight(N, negative=-1e4, seed=0), layout_weight(N, seed=1)])
    coef = torch.tensor([1e-5, 1.3])
    probs = rectified_cross_attention(q, k, v, weight, coef)[..., :M].float()       # (B, H, N, M)
    masked = (weight <= -1e4)[:, None].expand_as(probs)
    assert torch.isfinite(probs).all()
    assert (probs[masked] == 0).all(), "hard-masked probabilities must be exactly 0"
    assert (probs[~masked] > 0).any()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, N), atol=2e-2, rtol=0)
    expected = torch.stack([ref.rectified_attention_probs(q[b].double(), k[b].double(), weight[b].double(),
                                                          float(coef[b]), d ** -0.5) for b in range(B)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(probs.double(), expected, atol=tol, rtol=0)


def test_plain_attention_without_weight():
    q, k, v = inputs(2, 2, 37, 64)
    out = rectified_cross_attention(q, k, v, None, None, scale=0.1)
    torch.testing.assert_close(out.double(), spec(q, k, v, None, [0.0, 0.0], scale=0.1), atol=2e-5, rtol=1e-5)


def test_strided_inputs_and_head_merge_layout():
    """Views straight out of the attention processor (B, N, H, d).transpose(1, 2) need no copy, and
    the result is laid out so merging heads is a free view."""
    B, H, N, d = 2, 2, 37, 40
    q = torch.randn(B, N, H, d).transpose(1, 2)
    k, v = torch.randn(B, M, H, d).transpose(1, 2), torch.randn(B, M, H, d).transpose(1, 2)
    weight = torch.stack([layout_weight(N, seed=s) for s in range(B)])
    coef = torch.tensor([0.5, 0.2])
    out = rectified_cross_attention(q, k, v, weight, coef)
    torch.testing.assert_close(out.double(), spec(q, k, v, weight, coef), atol=2e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logit_std_prepass(dtype):
    """The pre-pass std equals torch.std of the materialised logits, also with a large mean (where
    E[S^2] - E[S]^2 would cancel), and skips coef == 0 samples."""
    B, H, N, d = 3, 2, 70, 64
    q, k, _ = inputs(B, H, N, d, dtype, mean=2.0)
    S = q.double() @ k.double().transpose(-1, -2)
    expected = S.flatten(1).std(dim=1)
    assert (S.flatten(1).mean(1).abs() > 10 * expected).all()      # the hard case
    torch.testing.assert_close(logit_std(q, k).double(), expected, rtol=2e-5, atol=0)
    skipped = logit_std(q, k, torch.tensor([1.0, 0.0, 0.5]))
    assert skipped[1] == 0
    torch.testing.assert_close(skipped[[0, 2]].double(), expected[[0, 2]], rtol=2e-5, atol=0)


def test_fully_masked_row_gives_zeros_not_nan():
    B, H, N, d = 1, 1, 37, 64
    q, k, v = inputs(B, H, N, d)
    weight = layout_weight(N)[None].clone()
    weight[0, 4] = -1e8                                          # row 4: every key masked
    out = rectified_cross_attention(q, k, v, weight, torch.tensor([0.5]))
    assert torch.isfinite(out).all()
    assert (out[0, 0, 4] == 0).all()
    rows = [i for i in range(N) if i != 4]
    torch.testing.assert_close(out[:, :, rows].double(), spec(q, k, v, weight, [0.5])[:, :, rows], atol=2e-5, rtol=1e-5)


def test_bad_inputs_name_the_field():
    q, k, v = inputs(2, 2, 37, 64)
    weight = torch.zeros(2, 37, M)
    coef = torch.tensor([0.1, 0.0])
    cases = [
        ((q, k, v, weight[:, :30], coef), "weight"),
        ((q, k, v, weight, torch.tensor([0.1])), "coef"),
        ((q, k, v, weight, None), "coef"),
        ((q, k.half(), v, weight, coef), "k"),
        ((q, k, v[:, :, :50], weight, coef), "v"),
        ((q[0], k, v, weight, coef), "q"),
        ((torch.randn(2, 2, 37, 300), torch.randn(2, 2, M, 300), torch.randn(2, 2, M, 300), weight, coef), "q"),
        ((q.long(), k.long(), v.long(), weight, coef), "q"),
    ]
    for args, field in cases:
        with pytest.raises(KernelArgumentError) as err:
            rectified_cross_attention(*args)
        assert err.value.field == field, (field, str(err.value))
        assert isinstance(err.value, ValueError) and str(err.value).startswith(f"{field}: ")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = inputs(1, 1, 8, 16)
    with pytest.raises(KernelArgumentError, match="CUDA") as err:
        rectified_cross_attention(q, k, v, None, None)
    assert err.value.field == "q"


# ---- bounded autotuning ---------------------------------------------------------------------------
def _levels(side: int) -> list[int]:
    """Latent side (pixels / 8) and its three downsamplings, rounding up (a UNet's 4 levels)."""
    sides = [side // 8]
    for _ in range(3):
        sides.append(-(-sides[-1] // 2))
    return sides


# (level -> (heads, head dim)) of the cross-attention layers: SD 1.5 has 8 heads of 320/640/1280/1280
# channels (the mid block at level 3), SD 2.1 heads of 64 channels.
SD_MODELS = {"sd15": [(8, 40), (8, 80), (8, 160), (8, 160)], "sd21": [(5, 64), (10, 64), (20, 64), (20, 64)]}
RESOLUTIONS = range(512, 1025, 64)


def sd_attention_shapes() -> set[tuple[int, int]]:
    """Every (N, head dim) of SD 1.x/2.x cross-attention for heights and widths 512..1024 step 64."""
    shapes = set()
    for levels in SD_MODELS.values():
        for height in RESOLUTIONS:
            for width in RESOLUTIONS:
                for (heads, d), h, w in zip(levels, _levels(height), _levels(width)):
                    shapes.add((h * w, d))
    return shapes


def test_sd_shapes_need_few_autotune_keys_and_configs():
    """The cold-start bound: all SD 1.x/2.x resolutions 512..1024 px (169 distinct N) share at most
    12 autotune keys per kernel and dtype (4 N buckets x 3 padded head dims), each benchmarking at
    most 4 configs: at most 2 kernels x 2 dtypes x 12 x 4 = 192 configs in all; fp32 benchmarks
    none. Keyed on exact N as before, they needed 297 keys x (24 + 12) configs per dtype."""
    shapes = sd_attention_shapes()
    assert len({n for n, _ in shapes}) == 169 and {d for _, d in shapes} == {40, 64, 80, 160}
    assert min(n for n, _ in shapes) == 64 and max(n for n, _ in shapes) == 128 * 128
    exact_n_keys = {(n, tuning.block_d(d)) for n, d in shapes}           # the former key, per dtype
    assert len(exact_n_keys) == 297
    totals = {}
    for kind in tuning.KINDS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            keys = {}
            for n, d in shapes:
                key = tuning.autotune_key(kind, n, 77, d, dtype)
                configs = tuning.benchmarked_configs(kind, n, 77, d, dtype, interpret=False)
                assert len(configs) <= tuning.MAX_TUNED_CONFIGS == 4
                keys.setdefault(key, len(configs))
                assert keys[key] == len(configs), "one key, one list of configs"
            totals[kind, dtype] = (len(keys), sum(keys.values()))
    for kind in tuning.KINDS:
        assert totals[kind, torch.float32] == (1, 0), "fp32 is never autotuned (its only key is None)"
        for dtype in (torch.float16, torch.bfloat16):
            n_keys, n_configs = totals[kind, dtype]
            assert 4 <= n_keys <= 12, (kind, dtype, n_keys)
            assert 2 * n_keys <= n_configs <= 4 * n_keys, (kind, dtype, n_configs)
    total = sum(c for _, c in totals.values())
    assert total <= 192 and total * 50 < len(exact_n_keys) * (24 + 12) * 2, total


def test_one_resolution_of_one_model_tunes_at_most_32_configs():
    """What a service warming one size pays: SD 2.1 fp16 at 768 px, 4 levels, both kernels."""
    keys = {}
    for (heads, d), h in zip(SD_MODELS["sd21"], _levels(768)):
        for kind in tuning.KINDS:
            keys[tuning.autotune_key(kind, h * h, 77, d, torch.float16)] = \
                tuning.benchmarked_configs(kind, h * h, 77, d, torch.float16, interpret=False)
    assert [h * h for h in _levels(768)] == [9216, 2304, 576, 144]
    assert len(keys) == 6            # 9216 and 2304 share the largest bucket
    assert sum(len(c) for c in keys.values()) <= 6 * 4


def test_n_buckets():
    assert [tuning.n_bucket(n) for n in (1, 64, 65, 256, 257, 1000, 1024, 1025, 4096, 9216, 16384)] == \
        [64, 64, 256, 256, 1024, 1024, 1024, 4096, 4096, 4096, 4096]


def test_pruning_fits_the_shape():
    """Tiles never exceed a small problem or the register / shared-memory budget of wide heads."""
    for kind in tuning.KINDS:
        for d in (40, 64, 80, 160):
            for n in (37, 200, 900, 9216):
                configs = tuning.benchmarked_configs(kind, n, 77, d, torch.float16, interpret=False)
                assert 2 <= len(configs) <= 4, (kind, d, n)
                for c in configs:
                    assert c.kwargs["BLOCK_N"] <= max(32, tuning.n_bucket(n))
                    assert c.kwargs["BLOCK_N"] * tuning.block_d(d) <= 128 * 128
                    assert c.kwargs["BLOCK_M"] * tuning.block_d(d) <= 128 * 128
                    if kind == "prepass":
                        assert c.kwargs["BLOCK_N"] >= tuning.MIN_PREPASS_BLOCK_N
    assert tuning.benchmarked_configs("attention", 9216, 77, 64, torch.float16) == []   # interpreter: one config
    assert tuning.benchmarked_configs("attention", 9216, 77, 64, torch.float32, interpret=False) == []


def _triton_key(autotuner, args, kwargs) -> tuple:
    """The key Triton's Autotuner.run builds: its key arguments' values, then every tensor's dtype."""
    named = {**dict(zip(autotuner.arg_names, args)), **kwargs}
    return tuple(named[k] for k in autotuner.keys) + tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_launch_uses_the_exposed_key_function(dtype, monkeypatch):
    """fp16 launches go through the autotuners with exactly `tuning.autotune_key`'s values (the
    kernels' own key names and prune function); fp32 launches never touch them."""
    tuned = {"attention": triton_rectified._rectified_attention_tuned, "prepass": triton_rectified._logit_moments_tuned}
    assert tuned["attention"].keys == list(tuning.ATTENTION_KEY)
    assert tuned["prepass"].keys == list(tuning.PREPASS_KEY)
    seen = {}
    for kind, autotuner in tuned.items():
        assert autotuner.early_config_prune is tuning.prune

        def spy(*args, _kind=kind, _original=autotuner.run, _autotuner=autotuner, **kwargs):
            seen[_kind] = _triton_key(_autotuner, args, kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(autotuner, "run", spy)
    B, H, N, d = 2, 2, 70, 40
    q, k, v = inputs(B, H, N, d, dtype)
    weight = torch.stack([layout_weight(N, seed=s) for s in range(B)])
    coef = torch.tensor([0.7, 0.0])
    out = rectified_cross_attention(q, k, v, weight, coef)
    torch.testing.assert_close(out.double(), spec(q, k, v, weight, coef), atol=3e-3, rtol=0)
    if dtype == torch.float32:
        assert seen == {} and tuning.autotune_key("attention", N, M, d, dtype) is None
        return
    for kind in tuning.KINDS:
        expected = tuning.autotune_key(kind, N, M, d, dtype)
        assert expected[0] == 256 and seen[kind][:len(expected) - 1] == expected[:-1], (kind, seen[kind], expected)
        assert expected[-1] == str(q.dtype) == seen[kind][len(expected) - 1]
