"""Smoke test of the independent SPEC reference (tests/spec_reference.py) on tiny random models."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402

torch.set_num_threads(1)

D = 32
H_IMG = W_IMG = 64


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []

    def chain(pieces):
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))

    for w in ["a", "photo", "of", "dog", "cat", "and", "on", "the", "mug", "table"]:
        chain(list(w[:-1]) + [w[-1] + "</w>"])
    # "sunflower" is split by the tokenizer into two tokens: "sun" + "flower</w>"
    chain(list("sun"))
    chain(list("flowe") + ["r</w>"])
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok("sunflower", add_special_tokens=False).input_ids == [vocab["sun"], vocab["flower</w>"]]
    return tok


@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64,
    ).eval()
    tok = _tiny_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=D, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    return {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok}


PROMPT = "a dog and a sunflower on a dog"
# tokens: 0 <s>, 1 a, 2 dog, 3 and, 4 a, 5 sun, 6 flower, 7 on, 8 a, 9 dog, 10 </s>


def test_positions(models):
    tok = models["tokenizer"]
    assert ref.subject_token_positions(tok, PROMPT, "dog") == [2, 9]
    assert ref.subject_occurrences(tok, PROMPT, "dog") == [2, 9]
    assert ref.subject_token_positions(tok, PROMPT, "sunflower") == [5, 6]
    assert ref.subject_token_positions(tok, PROMPT, "cat") == []
    # the padding / end token is never matched
    assert ref.subject_token_positions(tok, "a dog", "dog") == [2]


def test_compose_embeddings(models):
    te, tok = models["text_encoder"], models["tokenizer"]
    E = ref.encode_prompt(te, tok, PROMPT)
    E0 = ref.encode_prompt(te, tok, "")
    r_dog = torch.randn(1, D)
    r_sf1 = torch.randn(1, D)
    r_sf2 = torch.randn(2, D)

    C, U = ref.compose_embeddings(te, tok, PROMPT, {"dog": r_dog, "sunflower": r_sf1}, None)
    assert C.shape == (1, 77, D) and U.shape == (1, 77, D)
    assert torch.equal(U, E0)
    diff = C - E
    changed = sorted(int(i) for i in torch.nonzero(diff.abs().sum(-1)[0]).flatten())
    assert changed == [2, 5, 9]  # (1, D) residual on split word: first position only
    torch.testing.assert_close(diff[0, 2], r_dog[0])
    torch.testing.assert_close(diff[0, 9], r_dog[0])
    torch.testing.assert_close(diff[0, 5], r_sf1[0])

    C2, _ = ref.compose_embeddings(te, tok, PROMPT, {"sunflower": r_sf2}, None)
    torch.testing.assert_close((C2 - E)[0, 5:7], r_sf2)

    C3, _ = ref.compose_embeddings(te, tok, PROMPT, {"dog": r_dog}, {"dog": [9]})
    changed = sorted(int(i) for i in torch.nonzero((C3 - E).abs().sum(-1)[0]).flatten())
    assert changed == [9]


def test_weight_maps():
    tok = _tiny_tokenizer()
    mask_dog = torch.zeros(H_IMG, W_IMG, dtype=torch.bool)
    mask_dog[:, :32] = True
    mask_sf = torch.zeros(H_IMG, W_IMG, dtype=torch.bool)
    mask_sf[10:50, 20:60] = True
    levels = [(8, 8), (4, 4), (5, 7), (64, 64)]
    maps = ref.weight_maps(tok, PROMPT, {"dog": (mask_dog, 2.5), "sunflower": (mask_sf, 1.5)}, -1e8,
                           H_IMG, W_IMG, levels)
    assert set(maps) == set(levels)
    for (h, w), W in maps.items():
        assert W.shape == (h * w, 77) and W.dtype == torch.float32
        non_subject = [i for i in range(77) if i not in (2, 5, 6, 9)]
        assert torch.all(W[:, non_subject] == 0)
        assert torch.equal(W[:, 2], W[:, 9]) and torch.equal(W[:, 5], W[:, 6])
        grid = W[:, 2].reshape(h, w)  # row-major
        assert abs(float(grid[0, 0]) - 2.5) < 1e-5  # inside (left column)
        assert float(grid[-1, -1]) == pytest.approx(-1e8)  # far outside (right column)
        # every value is either ~strength or a hard mask (blends near the boundary stay <= -1e4)
        assert torch.all((grid - 2.5).abs() < 1e-5) == False  # noqa: E712
        assert torch.all(((grid - 2.5).abs() < 1e-5) | (grid <= -1e4))
        gs = W[:, 5].reshape(h, w)
        assert float(gs[0, 0]) == pytest.approx(-1e8)
    full = maps[(64, 64)][:, 5].reshape(64, 64)
    assert torch.all(full[mask_sf] == 1.5) and torch.all(full[~mask_sf] == -1e8)
    # (5, 7) is not an exact subsample: some boundary pixels get blends strictly between
    g57 = maps[(5, 7)][:, 2].reshape(5, 7)
    assert torch.any((g57 < -1e4) & (g57 > -1e8 * 0.999))


def test_hard_mask_and_literal_formula():
    g = torch.Generator().manual_seed(0)
    Hh, N, M, d = 2, 6, 77, 8
    q = torch.randn(Hh, N, d, generator=g) * 3
    k = torch.randn(Hh, M, d, generator=g) * 3
    v = torch.randn(Hh, M, d, generator=g)
    W = torch.zeros(N, M)
    W[:, 3] = torch.tensor([2.5, 2.5, -1e8, -5e7, -1e8, 2.5])
    W[:, 4] = torch.tensor([-1e8, -1e4, -9e3, 2.5, 2.5, -1e8])
    scale = d ** -0.5
    for coef in (1e-6, 0.05, 0.5):
        P = ref.rectified_attention_probs(q, k, W, coef, scale)
        assert torch.isfinite(P).all()
        hard = (W <= -1e4).expand_as(P)
        assert torch.all(P[hard] == 0)
        torch.testing.assert_close(P.sum(-1), torch.ones(Hh, N))
        if coef >= 0.05:  # the literal fp32 formula agrees (it underflows to exactly 0 too)
            S = q @ k.transpose(-1, -2)
            lit = torch.softmax((S + coef * W * S.std()) * scale, -1)
            torch.testing.assert_close(P, lit)
        out = ref.rectified_attention(q, k, v, W, coef, scale)
        torch.testing.assert_close(out, P @ v)
    # coef 0: plain attention, bitwise; no hard mask
    P0 = ref.rectified_attention_probs(q, k, W, 0.0, scale)
    assert torch.equal(P0, ref.rectified_attention_probs(q, k, None, 0.0, scale))
    assert torch.all(P0 > 0)


def test_schedules_match_diffusers():
    from diffusers import EulerDiscreteScheduler

    for sched, b0, b1 in (("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)):
        ts, sig = ref.euler_sigmas(7, b0, b1, sched, 1000)
        s = EulerDiscreteScheduler(beta_start=b0, beta_end=b1, beta_schedule=sched, num_train_timesteps=1000,
                                   timestep_spacing="linspace")
        s.set_timesteps(7)
        np.testing.assert_allclose(ts, s.timesteps.numpy(), rtol=0, atol=1e-4)
        torch.testing.assert_close(sig, s.sigmas.float())
    assert ref.guidance_sigmas(5).shape == (6,) and float(ref.guidance_sigmas(5)[-1]) == 0.0
    gs = float(ref.guidance_sigmas(4)[1])
    assert ref.guidance_coef(0.08, 4, 1) == pytest.approx(0.08 * np.log(1 + gs * gs))


def test_processor_plain_matches_diffusers_and_hits_levels(models):
    unet = models["unet"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    c = torch.randn(1, 77, D, generator=torch.Generator().manual_seed(2))
    saved = unet.attn_processors
    with torch.no_grad():
        base = unet(x, 500.0, encoder_hidden_states=c).sample
        try:
            state = {"weights_by_n": None, "coef": 0.0}
            unet.set_attn_processor(ref.ReferenceAttnProcessor(state))
            ours = unet(x, 500.0, encoder_hidden_states=c).sample
            seen = []

            class Rec(dict):
                def __getitem__(self, n):
                    seen.append(n)
                    return dict.__getitem__(self, n)

            state["weights_by_n"] = Rec({n: torch.zeros(n, 77) for n in (64, 16)})
            state["coef"] = 0.3
            ours_w0 = unet(x, 500.0, encoder_hidden_states=c).sample
        finally:
            unet.set_attn_processor(saved)
    torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours_w0, ours)  # zero weight map: rectification is a no-op
    assert set(seen) == {64, 16}


def _gen(models, **kw):
    args = dict(prediction_type="epsilon", prompt=PROMPT, residuals={"dog": torch.randn(1, D,
                generator=torch.Generator().manual_seed(3))}, positions=None, regions={}, seed=7, steps=3,
                guidance_steps=3, guidance_weight=0.08, cfg_scale=7.5, negative_weight=-1e8,
                height=H_IMG, width=W_IMG, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000)
    args.update(kw)
    return ref.reference_generate(**models, **args)


def _regions():
    m1 = torch.zeros(H_IMG, W_IMG, dtype=torch.bool)
    m1[:, :32] = True
    m2 = torch.zeros(H_IMG, W_IMG, dtype=torch.bool)
    m2[:, 32:] = True
    return {"dog": (m1, 2.5), "sunflower": (m2, 2.5)}


def test_generate(models):
    plain = _gen(models)
    lat = plain["latents"]
    assert lat.shape == (1, 4, 8, 8) and lat.dtype == torch.float32 and torch.isfinite(lat).all()
    assert plain["cond_embeddings"].shape == (1, 77, D)
    img = plain["image"]
    assert isinstance(img, np.ndarray) and img.shape == (H_IMG, W_IMG, 3) and img.dtype == np.uint8

    # guidance weight 0 with regions == no regions (both with self-recurrence)
    zero = _gen(models, regions=_regions(), guidance_weight=0.0)
    assert torch.equal(zero["latents"], plain["latents"])

    guided = _gen(models, regions=_regions(), guidance_weight=0.5)
    assert torch.isfinite(guided["latents"]).all()
    assert not torch.allclose(guided["latents"], plain["latents"])

    # no self-recurrence (G=0) differs from G=3; v-prediction runs
    g0 = _gen(models, guidance_steps=0)
    assert not torch.allclose(g0["latents"], plain["latents"])
    v = _gen(models, prediction_type="v_prediction", regions=_regions(), guidance_steps=2)
    assert torch.isfinite(v["latents"]).all()
