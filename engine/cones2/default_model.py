"""The embedded default model, used wherever no `--model` is given.

In order: `$CONES2_DEFAULT_MODEL` (a diffusers directory), else the demo model shipped inside the
package (`data/demo_model`, trained by `cones2_train.demo_world`, docs/demo_model.md), else a tiny
Stable-Diffusion-shaped model with random weights (its pictures are noise), built
deterministically and cached under the user cache directory. The tiny random model exercises every
code path a real SD 2.x checkpoint does (v-prediction, CLIP BPE tokenizer padding with "!",
cross-attention at several resolutions including the mid block); the tests build it with
`build_tiny_model`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import atomic_directory

TINY_VERSION = "tiny-sd-v1"
TINY_RESOLUTION = 128


def cache_root() -> Path:
    """$CONES2_CACHE, else $XDG_CACHE_HOME/cones2-engine, else ~/.cache/cones2-engine."""
    if os.environ.get("CONES2_CACHE"):
        return Path(os.environ["CONES2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cones2-engine"


def shipped_demo_model() -> Path | None:
    """The trained demo model inside the package, or None when this build does not carry it."""
    from importlib import resources

    path = Path(str(resources.files("cones2").joinpath("data/demo_model")))
    return path if (path / "model_index.json").is_file() else None


def default_model_dir() -> Path:
    """Path of the embedded default model (see the module docstring for the order)."""
    if os.environ.get("CONES2_DEFAULT_MODEL"):
        return Path(os.environ["CONES2_DEFAULT_MODEL"])
    shipped = shipped_demo_model()
    if shipped is not None:
        return shipped
    return tiny_model_dir()


def tiny_model_dir() -> Path:
    """The tiny random model in the user cache, built on first use."""
    target = cache_root() / TINY_VERSION
    if not (target / "model_index.json").is_file():
        build_tiny_model(target)
    return target


def build_tiny_model(out_dir: str | os.PathLike, *, prediction_type: str = "v_prediction", text_dim: int = 32,
                     seed: int = 0, resolution: int = TINY_RESOLUTION) -> Path:
    """Write a tiny SD-shaped diffusers directory to `out_dir` (atomically) and return it.

    prediction_type "v_prediction" + pad "!" mimics SD 2.x; "epsilon" + end-token padding, SD 1.x.
    If another process finishes the same folder first, its copy is kept (a shared cache entry).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .loading import quiet_library_logging
    from .tokenizer_data import build_clip_tokenizer

    quiet_library_logging()

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, keep_existing=True) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=text_dim,
                attention_head_dim=(2, 4, 4), use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            )
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=(8, 16, 16, 16), sample_size=resolution,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            )
            torch.manual_seed(seed + 2)
            sd2 = prediction_type == "v_prediction"
            tokenizer = build_clip_tokenizer(pad_token="!" if sd2 else None)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
            ))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, prediction_type=prediction_type)
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_cones2_tiny": TINY_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }, indent=2))
    return out_dir
