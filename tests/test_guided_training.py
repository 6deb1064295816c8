"""Training the demo UNet under layout guidance (`cones2_train.demo_world.guided_training`, issue 14).

The rectification used in training is checked against SPEC 3 written out here (the weight maps from a
hand-built full-resolution map, the coefficients from the closed form of sigma at t = 999) and against
the engine's `reference` attention backend; the training run against its recorded schedule.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from cones2_train.demo_world import guided_training as G


def test_guided_coefficients_by_hand():
    from cones2_train.demo_world.stages import alphas_cumprod

    coef = G.guided_coefficients()
    # t = 999 is sampling step 0: sigma_0^2 = (1 - abar) / abar, so log(1 + sigma_0^2) = -log(abar)
    assert float(coef[999]) == pytest.approx(-0.08 * math.log(float(alphas_cumprod()[999])), rel=1e-4)
    # the sampler's 30 steps sit at 999 - 999 k / 29: step 14 at 516.7 (guided), step 15 at 482.2 (not)
    assert float(coef[500]) > 0 and float(coef[499]) == 0 and float(coef[0]) == 0
    guided = coef[coef > 0]
    assert len(torch.unique(guided)) == G.GUIDED_STEPS            # one value per guided step
    assert bool((coef[500:].diff() >= 0).all())                  # noisier steps are rectified harder


def test_rectification_maps_are_spec3_weight_maps():
    shapes = [(16, 16), (8, 8), (4, 4)]
    positions = torch.tensor([[3, 6], [2, 0]])
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5]], [[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    chosen = torch.tensor([True, False])
    margins = torch.tensor([[4, 0], [0, 0]])
    maps = G.rectification_maps(positions, boxes, valid, chosen, margins, 64, shapes)

    def spec(x0, y0, x1, y1, h):                    # box in whole pixels of the 64 px image
        full = torch.full((1, 1, 64, 64), -1e8)
        full[..., y0:y1, x0:x1] = 2.5
        return F.interpolate(full, size=(h, h), mode="bilinear", align_corners=True).flatten()

    for h, _ in shapes:
        W = maps[h * h]
        assert W.shape == (2, h * h, 77)
        assert torch.equal(W[1], torch.zeros(h * h, 77))                          # not chosen: plain attention
        assert torch.allclose(W[0, :, 3], spec(12, 12, 36, 36, h))                # grown by 4 px
        assert torch.allclose(W[0, :, 6], spec(32, 0, 64, 32, h))                 # clipped at the edges
        others = [k for k in range(77) if k not in (3, 6)]
        assert torch.equal(W[0][:, others], torch.zeros(h * h, 75))


def test_recording_processor_rectifies_like_the_reference_backend():
    from diffusers.models.attention_processor import Attention

    from cones2.attention.backends import ReferenceBackend
    from cones2_train.demo_world.grounding import RecordingAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8)
    hidden, text = torch.randn(2, 16, 32), torch.randn(2, 77, 16)
    W = torch.zeros(2, 16, 77)
    W[:, :, 5] = -1e8
    W[:, :6, 5] = 2.5                                    # token 5 may only look at pixels 0..5
    coef = torch.tensor([0.4, 0.0])                     # the second sample is plain attention
    q = attn.to_q(hidden).view(2, 16, 2, 8).transpose(1, 2)
    k, v = (f(text).view(2, 77, 2, 8).transpose(1, 2) for f in (attn.to_k, attn.to_v))
    expected = ReferenceBackend().cross(q, k, v, W, coef, attn.scale).transpose(1, 2).reshape(2, 16, 16)
    expected = attn.to_out[1](attn.to_out[0](expected))
    for recording in (True, False):
        proc = RecordingAttnProcessor(levels=(16,))
        proc.recording, proc.rectification = recording, ({16: W}, coef)
        with torch.no_grad():
            out = proc(attn, hidden, encoder_hidden_states=text)
        assert torch.allclose(out, expected, atol=1e-5)
    proc = RecordingAttnProcessor(levels=(16,))
    proc.recording, proc.rectification = True, ({16: W}, coef)
    with torch.no_grad():
        proc(attn, hidden, encoder_hidden_states=text)
    (probs,) = proc.take()
    assert torch.equal(probs[0, 6:, 5], torch.zeros(10))                           # hard mask: exactly 0
    assert bool((probs[1, 6:, 5] > 0).all())                                        # coef 0: untouched


@pytest.fixture(scope="module")
def finished_smoke_run(tmp_path_factory):
    from cones2_train.demo_world.recipe import Recipe
    from cones2_train.demo_world.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("guided-smoke")
    train(out, Recipe.smoke(), progress=False)
    return out


def test_guided_tail_extends_a_finished_run(finished_smoke_run, tmp_path, monkeypatch):
    """`--steps unet=6 --guided-tail 3 --resume` on a finished 3-step run: steps 3-5 rectify samples
    (the maps reach the UNet), the artefact and checkpoint record it, and a checkpoint inside the tail
    refuses a recipe with another share or no guided training."""
    from cones2_train.demo_world import stages
    from cones2_train.demo_world.train import main

    shutil.copytree(finished_smoke_run, tmp_path, dirs_exist_ok=True)
    chosen_per_step = []
    real = stages.rectification_maps

    def spy(positions, boxes, valid, chosen, *args):
        chosen_per_step.append(int(chosen.sum()))
        return real(positions, boxes, valid, chosen, *args)

    monkeypatch.setattr(stages, "rectification_maps", spy)
    common = ["--out", str(tmp_path), "--smoke", "--no-progress", "--resume"]
    assert main([*common, "--steps", "unet=6", "--guided-tail", "3", "--guided-fraction", "1"]) == 0
    assert len(chosen_per_step) == 3 and sum(chosen_per_step) > 0
    state = json.loads((tmp_path / "checkpoints" / "unet" / "state.json").read_text())
    assert state["info"]["guided_start"] == 3 and state["info"]["guided_fraction"] == 1.0
    meta = stages.read_meta(tmp_path / "stages" / "unet.safetensors")
    assert meta["guided"] == {"tail": 3, "fraction": 1.0}
    for other in (["--steps", "unet=8"], ["--steps", "unet=8", "--guided-tail", "5", "--guided-fraction", "0.5"]):
        assert main([*common, *other]) == 2                      # guided training began at step 3 of 6
    assert main([*common, "--steps", "unet=8", "--guided-tail", "5", "--guided-fraction", "1"]) == 0
    assert main([*common, "--steps", "unet=8", "--guided-tail", "9"]) == 2         # longer than the stage
    assert main([*common, "--steps", "unet=8", "--guided-tail", "5", "--guided-fraction", "0"]) == 2
