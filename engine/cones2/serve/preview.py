"""Cheap low-resolution previews for GenerateStream: latents -> RGB without the VAE.

A fixed linear map from the 4 SD latent channels to RGB (the widely used approximation for SD 1.x/2.x
latents) at latent resolution, 1/8 of the output. Good enough to watch composition emerge; it costs
a (4 -> 3) matrix product per requested preview, off the UNet's path.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# rows: latent channels 0..3; columns: R, G, B
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208],
                           [0.187, 0.286, 0.173],
                           [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """latents: (C, h, w) -> an RGB image (w x h). C != 4 falls back to the first 3 channels."""
    x = latents.detach().float().cpu()
    if x.shape[0] == LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", x, LATENT_RGB)
    else:
        rgb = x[:3].permute(1, 2, 0) if x.shape[0] >= 3 else x[:1].permute(1, 2, 0).expand(-1, -1, 3)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def latent_preview_png(latents: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    latent_preview(latents).save(buf, format="PNG")
    return buf.getvalue()
