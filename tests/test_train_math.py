"""cones2_train building blocks against independent computations (SPEC 1.2, 1.3, 1.5): the regulariser,
the denoising targets, caption positions, image preprocessing and the checkpoint's optimizer state."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cones2 import Cones2Error
from cones2_train.checkpoint import join_optimizer_state, split_optimizer_state
from cones2_train.data import to_pixels
from cones2_train.objective import DenoisingObjective
from cones2_train.regularizer import embedding_preservation
from cones2_train.templates import captions_for, load_templates


def _reference_reg(tuned: np.ndarray, frozen: np.ndarray, k: int, a: float, b: float) -> float:
    """SPEC 1.3 written out with explicit loops in float64."""
    first = math.sqrt(sum((float(tuned[0, j]) - float(frozen[0, j])) ** 2 for j in range(tuned.shape[1])))
    rest = 0.0
    for i in range(1 + k, tuned.shape[0]):
        for j in range(tuned.shape[1]):
            rest += (float(tuned[i, j]) - float(frozen[i, j])) ** 2
    return a * first + b * math.sqrt(rest)


@pytest.mark.parametrize("k", [1, 3])
def test_regulariser_matches_independent_computation(k):
    gen = torch.Generator().manual_seed(k)
    tuned, frozen = torch.randn(77, 8, generator=gen), torch.randn(77, 8, generator=gen)
    got = embedding_preservation(tuned, frozen, k, 1e-2, 1e-3)
    want = _reference_reg(tuned.numpy(), frozen.numpy(), k, 1e-2, 1e-3)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-6)
    # The subject rows 1..k are free: changing them does not change the loss.
    moved = tuned.clone()
    moved[1 : 1 + k] += 100.0
    assert embedding_preservation(moved, frozen, k, 1e-2, 1e-3).item() == pytest.approx(got.item(), rel=1e-7)


def test_regulariser_known_values_and_zero_gradient():
    frozen = torch.zeros(77, 4)
    tuned = torch.zeros(77, 4)
    tuned[0] = torch.tensor([3.0, 4.0, 0.0, 0.0])      # ||.|| = 5
    tuned[2, 0], tuned[5, 1] = 6.0, 8.0                 # tail ||.|| = 10 with k = 1 (row 1 is free)
    tuned[1] = 1000.0
    assert embedding_preservation(tuned, frozen, 1, 0.5, 0.25).item() == pytest.approx(0.5 * 5 + 0.25 * 10)
    x = frozen.clone().requires_grad_(True)             # first step: E' == E0 exactly
    embedding_preservation(x, frozen, 1, 1e-2, 1e-3).backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoising_target_matches_ddpm_formulas(prediction):
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "prediction_type": prediction}
    obj = DenoisingObjective.from_scheduler_config(config, torch.device("cpu"))
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(obj.alphas_cumprod.numpy(), ac, rtol=2e-5)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([0, 999])
    noisy, target = obj.noisy_and_target(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        s, n = math.sqrt(ac[ti]), math.sqrt(1 - ac[ti])
        np.testing.assert_allclose(noisy[i].numpy(), s * x0[i].numpy() + n * noise[i].numpy(), rtol=1e-4, atol=1e-5)
        want = noise[i].numpy() if prediction == "epsilon" else s * noise[i].numpy() - n * x0[i].numpy()
        np.testing.assert_allclose(target[i].numpy(), want, rtol=1e-4, atol=1e-5)


def test_unsupported_prediction_type_is_a_clear_error():
    with pytest.raises(Cones2Error, match="sample"):
        DenoisingObjective.from_scheduler_config({"prediction_type": "sample"}, torch.device("cpu"))


def test_shipped_templates_are_about_a_hundred_with_one_slot():
    templates = load_templates()
    assert 90 <= len(templates) <= 120
    assert all(t.count("{}") == 1 for t in templates)
    assert len(set(templates)) == len(templates)


def test_caption_positions_are_where_the_slot_is():
    from cones2.tokenizer_data import build_clip_tokenizer

    tok = build_clip_tokenizer()
    word_ids = tok("teddy bear", add_special_tokens=False).input_ids
    templates = ["a photo of a {}", "{} on the table", "a teddy bear next to a {}", "my {}, outdoors"]
    caps = captions_for(tok, templates, "teddy bear", word_ids)
    for template, cap in zip(templates, caps):
        # independent: the slot's tokens start right after the prefix's own tokens (and the start token)
        prefix = template.split("{}")[0]
        start = 1 + len(tok(prefix, add_special_tokens=False).input_ids)
        assert cap.start == start
        assert list(cap.token_ids[start : start + 2]) == word_ids
    with pytest.raises(Cones2Error, match="does not tokenize"):
        captions_for(tok, ["a photo of {}s"], "dog", tok("dog", add_special_tokens=False).input_ids)


def test_template_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("# comment\na photo of a {}\na photo of nothing\n")
    with pytest.raises(Cones2Error, match=r"t.txt line 3"):
        load_templates(str(bad))
    (tmp_path / "empty.txt").write_text("\n# only comments\n")
    with pytest.raises(Cones2Error, match="no templates"):
        load_templates(str(tmp_path / "empty.txt"))


def test_resize_and_center_crop():
    # a 40x20 image: left quarter red, middle half green, right quarter blue -> a 16 px center crop is green
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10, 0] = 255
    arr[:, 10:30, 1] = 255
    arr[:, 30:, 2] = 255
    pixels = to_pixels([Image.fromarray(arr)], 16)
    assert pixels.shape == (1, 3, 16, 16)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    center = pixels[0, :, 4:12, 4:12]
    assert torch.allclose(center[1], torch.ones(8, 8), atol=1e-6)
    assert torch.allclose(center[0], -torch.ones(8, 8), atol=1e-6)


def test_optimizer_state_round_trips_through_tensors_and_json():
    import json

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(3, 2)
    opt.step()
    sd = opt.state_dict()
    tensors, doc = split_optimizer_state(sd)
    back = join_optimizer_state(tensors, json.loads(json.dumps(doc)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=5.0)
    opt2.load_state_dict(back)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(s1["state"][0][key], s2["state"][0][key])
