"""Randomly initialised SD-shaped components from diffusers/transformers config files.

Real layer shapes without real weights: what benchmarks need where no checkpoint can be fetched
(the SD 2.1 configs ship in `bench/configs/sd21/`). Pictures from these models are noise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cones2.errors import Cones2Error
from cones2.loading import Components, quiet_library_logging
from cones2.tokenizer_data import build_clip_tokenizer

CONFIG_FILES = ("unet", "vae", "text_encoder", "scheduler")


def read_configs(config_dir: str | os.PathLike) -> dict[str, dict]:
    """The four component configs of `config_dir` (unet.json, vae.json, text_encoder.json, scheduler.json)."""
    config_dir = Path(config_dir)
    files = {n: config_dir / f"{n}.json" for n in CONFIG_FILES}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise Cones2Error(f"component configs not found: {', '.join(missing)}", "config_dir")
    return {n: json.loads(p.read_text()) for n, p in files.items()}


def random_components(config_dir: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, *, unet_dtype: torch.dtype | None = None,
                      seed: int = 0) -> Components:
    """Components (CLIP tokenizer, text encoder, UNet, VAE, scheduler config) with random weights.

    dtype: text encoder and VAE; unet_dtype: the UNet (default `dtype`; training keeps the others
    in fp32 and the UNet in bf16). Built directly on `device`, seeded by `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = read_configs(config_dir)
    text_cfg = {k: v for k, v in cfg["text_encoder"].items() if k != "architectures"}
    torch.manual_seed(seed)
    quiet_library_logging()  # no "keep these modules in float32" notices: the weights are random anyway
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg["unet"]).to(unet_dtype or dtype)
        vae = AutoencoderKL.from_config(cfg["vae"]).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(build_clip_tokenizer(pad_token="!"), text_encoder, unet, vae, cfg["scheduler"],
                      str(config_dir), f"random-init@{Path(config_dir).name}")
