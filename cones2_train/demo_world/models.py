"""Build the demo model's networks from a `Recipe`, and write them as the diffusers directory the
engine loads (fp16 safetensors; the conventions of `cones2.default_model`).

The classes are the ones Stable Diffusion 2.x uses: AutoencoderKL (4 blocks: 64 px -> 8x8 latents;
3 blocks: 16x16), CLIPTextModel with the real CLIP BPE tokenizer (pads with "!"),
UNet2DConditionModel with cross-attention at the latent size, at its half and in the mid block, an
Euler scheduler on SD's betas.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from cones2.atomic import atomic_directory
from cones2.loading import quiet_library_logging

from .recipe import Recipe
from .world import IMAGE_SIZE

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@functools.lru_cache(maxsize=1)
def build_tokenizer():
    """CLIP's BPE tokenizer, SD 2.x padding ("!"); built once per process (parsing the merges is slow)."""
    from cones2.tokenizer_data import build_clip_tokenizer

    return build_clip_tokenizer(pad_token="!")


def build_vae(recipe: Recipe):
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=recipe.latent_channels, layers_per_block=1,
                         norm_num_groups=8, block_out_channels=tuple(recipe.vae_channels), sample_size=IMAGE_SIZE,
                         down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
                         up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels))


def build_text_encoder(recipe: Recipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed + 1)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=4 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu"))


def build_unet(recipe: Recipe):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(recipe.seed + 2)
    ch = tuple(recipe.unet_channels)
    return UNet2DConditionModel(
        sample_size=recipe.latent_size, in_channels=recipe.latent_channels, out_channels=recipe.latent_channels,
        layers_per_block=1, block_out_channels=ch, norm_num_groups=min(32, ch[0] // 2),
        cross_attention_dim=recipe.text_width, attention_head_dim=tuple(recipe.unet_heads), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def scheduler_config(recipe: Recipe) -> dict:
    from diffusers import EulerDiscreteScheduler

    return dict(EulerDiscreteScheduler(prediction_type=recipe.prediction_type, **SD_SCHEDULE).config)


def write_model_dir(out_dir: str | os.PathLike, recipe: Recipe, vae, text_encoder, unet, tokenizer,
                    info: dict | None = None) -> Path:
    """Write the diffusers-layout directory (fp16 safetensors) atomically; replaces `out_dir`."""
    from diffusers import EulerDiscreteScheduler

    quiet_library_logging()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out_dir) as tmp:
        for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
            _half_copy(module).save_pretrained(tmp / name, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        EulerDiscreteScheduler(prediction_type=recipe.prediction_type, **SD_SCHEDULE).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_cones2_demo": recipe.demo_version,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }, indent=2))
        (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), **(info or {})}, indent=2))
    return out_dir



def _half_copy(module):
    import copy

    return copy.deepcopy(module).to(torch.float16)


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Total size of the safetensors files under a model directory."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*.safetensors"))
