"""A diffusers-layout SD folder written as one checkpoint in the original (LDM / CompVis) key layout,
the form A1111 and ComfyUI users have: the reverse of diffusers' single-file conversion, written from
the LDM module names (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in (inner or {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            return new + rest
    return None


def unet_prefixes(cfg: dict) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers -> LDM prefixes of the UNet: (resnet blocks, everything else)."""
    L, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    resnets, other = {}, {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                          "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                          "mid_block.attentions.0.": "middle_block.1."}
    resnets.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."})
    for i in range(n):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            other[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < n - 1:
            other[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (L + 1) + L}.0.op."
        for j in range(L + 1):
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (L + 1) + j}.0."
            other[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (L + 1) + j}.1."
        if i < n - 1:
            slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
            other[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (L + 1) + L}.{slot}."
    return resnets, other


def vae_prefixes(cfg: dict) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers -> LDM prefixes of the VAE: (attention blocks, everything else)."""
    n = len(cfg["block_out_channels"])
    other = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    attention = {}
    for part in ("encoder", "decoder"):
        other.update({f"{part}.conv_in.": f"{part}.conv_in.", f"{part}.conv_out.": f"{part}.conv_out.",
                      f"{part}.conv_norm_out.": f"{part}.norm_out.",
                      f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                      f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2."})
        attention[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        for j in range(cfg["layers_per_block"] + 1):
            other[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            other[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        other[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        other[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - i}.upsample.conv."
    return attention, other


def to_original_layout(model_dir: Path) -> dict[str, torch.Tensor]:
    """The folder's UNet, VAE and CLIP text encoder under their LDM names (SD 1.x text-encoder layout)."""
    out: dict[str, torch.Tensor] = {}
    cfg = json.loads((model_dir / "unet/config.json").read_text())
    resnets, other = unet_prefixes(cfg)
    for key, t in load_file(model_dir / "unet/diffusion_pytorch_model.safetensors").items():
        new = _rename(key, resnets, UNET_RESNET) or _rename(key, other)
        assert new is not None, key
        out["model.diffusion_model." + new] = t
    cfg = json.loads((model_dir / "vae/config.json").read_text())
    attention, other = vae_prefixes(cfg)
    for key, t in load_file(model_dir / "vae/diffusion_pytorch_model.safetensors").items():
        new = _rename(key, attention, VAE_ATTENTION)
        if new is not None and t.ndim == 2:
            t = t[:, :, None, None]            # LDM's VAE attention projections are 1x1 convolutions
        new = new or _rename(key, other, {"conv_shortcut": "nin_shortcut"})
        assert new is not None, key
        out["first_stage_model." + new] = t
    for key, t in load_file(model_dir / "text_encoder/model.safetensors").items():
        if key.endswith("position_ids"):
            continue
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = t
    return out
