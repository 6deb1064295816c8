"""The trainer's steps against a plain SPEC 1 training loop written here, from the SPEC alone.

`cones2_train.Trainer` splits the backward pass (UNet down to a detached copy of the text embedding,
then `backward([enc, reg])` through the encoder), clips, steps a fused AdamW, draws latents from a
cached VAE posterior (`LatentCache`, scaled and shifted) and a timestep per step. The loop below does
none of that: it runs the VAE itself, builds the DDPM schedule from the betas, and takes one
`(mse + reg).backward()` per step with stock `clip_grad_norm_` and `torch.optim.AdamW`, on a model
loaded separately with diffusers / transformers. Same seed, same batch: after 3 steps every parameter
of the tuned encoder must agree within 1e-6.

Two settings: SPEC 1's defaults as the config ships them (lr 5e-6 moves a parameter by ~1e-5 over 3
steps, so 1e-6 sees the gradient's direction but not clipping or weight decay), and a "loud" one (lr
1e-3, tight clip, strong regulariser, weight decay 0.1, a 2-token word, a VAE with a shift factor)
where every one of those parts moves parameters by much more than 1e-6.
"""
from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cones2_train import TrainConfig, Trainer

# SPEC 1.3 / 1.4, restated: AdamW, lr 5e-6, constant, batch 1, 4000 steps, clip 1.0, a = 1e-2, b = 1e-3;
# the prompt is the bare word; resolution: the model's own (768 for SD 2.1). Weight decay is AdamW's
# customary 1e-2 (torch's default), which SPEC's "AdamW" leaves as is.
SPEC_1 = dict(lr=5e-6, batch_size=1, steps=4000, grad_clip=1.0, reg_first=1e-2, reg_rest=1e-3, weight_decay=1e-2)
STEPS = 3


def test_train_config_defaults_are_spec_1():
    c = TrainConfig()
    assert {k: getattr(c, k) for k in SPEC_1} == SPEC_1
    assert (c.train_prompt, c.resolution, c.dtype) == ("{}", None, None)


def _images(resolution: int, n: int) -> list[Image.Image]:
    """n distinct square images at the training size (so resize and crop leave them untouched)."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (resolution, resolution), (30 + 60 * i, 120, 200 - 50 * i))
        ImageDraw.Draw(im).ellipse((10 + 9 * i, 16, resolution - 20, resolution - 8 - 7 * i), fill=(220, 80 + 40 * i, 40))
        out.append(im)
    return out


def _alphas_cumprod(sched: dict) -> torch.Tensor:
    """DDPM's alpha-bar_t from the checkpoint's betas (scaled_linear or linear), float32."""
    T = sched["num_train_timesteps"]
    if sched["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    else:
        assert sched["beta_schedule"] == "linear"
        betas = torch.linspace(sched["beta_start"], sched["beta_end"], T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def _image_order(seed: int, n: int, step: int) -> int:
    """Which image step `step` trains on (batch 1): the trainer's documented order, one seeded
    permutation per epoch (SPEC says only "take an image"; this fixes which, so batches match)."""
    epoch, r = divmod(step, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[r])


def plain_spec_1_training(model_dir, images, word: str, *, steps: int, seed: int, lr: float, grad_clip: float,
                          reg_first: float, reg_rest: float, weight_decay: float) -> torch.nn.Module:
    """SPEC 1.1-1.4 as a reader would write it: returns the tuned text-encoder copy E'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval().requires_grad_(False)
    frozen = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    sched = json.loads((model_dir / "scheduler/scheduler_config.json").read_text())
    alphas_cumprod = _alphas_cumprod(sched)

    tuned = copy.deepcopy(frozen).requires_grad_(True)                 # 1.1: only the copy trains, all of it
    ids = tokenizer(word, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    k = len(tokenizer(word, add_special_tokens=False).input_ids)
    with torch.no_grad():
        e0 = frozen(ids).last_hidden_state[0]                          # E0(s), (77, D)
        pixels = [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
                  for im in images]
        posteriors = [vae.encode(p).latent_dist for p in pixels]
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        post = posteriors[_image_order(seed, len(images), step)]
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)   # a posterior sample
        x0 = (z - shift) * scaling                                                # 1.2: latents * scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (1,), generator=gen)           # uniform timestep
        ac = alphas_cumprod[t]
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        target = noise if sched["prediction_type"] == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        enc = tuned(ids).last_hidden_state                                      # E'(s), (1, 77, D)
        mse = F.mse_loss(unet(noisy, t, enc).sample, target)
        diff = enc[0] - e0                                                       # 1.3, plain L2 norms
        reg = reg_first * diff[0].norm() + reg_rest * diff[1 + k:].norm()     # (0 gradient at E' == E0)
        (mse + reg).backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return tuned


@pytest.fixture(scope="module")
def shifted_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a VAE that declares a latent shift (as SD3-style VAEs do), so LatentCache's
    shift is exercised; SD's own VAEs have none."""
    out = tmp_path_factory.mktemp("shifted") / "tiny-v-shift"
    shutil.copytree(tiny_model_dir, out)
    cfg_path = out / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["shift_factor"] = 0.25
    cfg_path.write_text(json.dumps(cfg))
    return out


SETTINGS = {
    "spec-defaults": dict(word="dog", seed=0, config={}, model="plain"),
    "loud": dict(word="teddybear", seed=5, model="shifted",
                 config=dict(lr=1e-3, grad_clip=0.05, reg_first=0.5, reg_rest=0.2, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_trainer_steps_equal_a_plain_spec_1_loop(name, tiny_model_dir, shifted_model_dir):
    setting = SETTINGS[name]
    model_dir = shifted_model_dir if setting["model"] == "shifted" else tiny_model_dir
    config = TrainConfig(steps=STEPS, seed=setting["seed"], device="cpu", dtype="fp32", **setting["config"])
    resolution = 128                                             # the tiny model's own (config.resolution None)
    images = _images(resolution, 2)
    trainer = Trainer(str(model_dir), images, setting["word"], config)
    assert trainer.resolution == resolution and trainer.k == (2 if setting["word"] == "teddybear" else 1)
    before = {n: p.detach().clone() for n, p in trainer.tuned.named_parameters()}
    trainer.train(progress=False)

    hyper = {**SPEC_1, **setting["config"]}
    plain = plain_spec_1_training(model_dir, images, setting["word"], steps=STEPS, seed=setting["seed"],
                                  lr=hyper["lr"], grad_clip=hyper["grad_clip"], reg_first=hyper["reg_first"],
                                  reg_rest=hyper["reg_rest"], weight_decay=hyper["weight_decay"])
    want = dict(plain.named_parameters())
    worst, moved = 0.0, 0.0
    for n, got in trainer.tuned.named_parameters():
        worst = max(worst, (got.detach() - want[n].detach()).abs().max().item())
        moved = max(moved, (want[n].detach() - before[n]).abs().max().item())
    print(f"{name}: max |trainer - plain| {worst:.3g}, max parameter move {moved:.3g}")
    assert moved > 10 * 1e-6, "the steps must move parameters by more than the tolerance"
    assert worst <= 1e-6, f"{name}: trainer and the plain SPEC 1 loop differ by {worst:.3g} after {STEPS} steps"
    assert math.isfinite(trainer.last_loss)
