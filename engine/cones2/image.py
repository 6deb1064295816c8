"""Latents -> pixels, PNG metadata, and the layout preview drawn over an image."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

PREVIEW_COLORS = [(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 64, 255),
                  (0, 220, 220), (255, 128, 0), (160, 160, 160)]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """vae.decode(x / scaling_factor), [-1, 1] -> uint8 (R, H, W, 3) (SPEC 4)."""
    scaled = (latents / vae.config.scaling_factor).to(vae.device, vae.dtype)
    pixels = vae.decode(scaled, return_dict=False)[0].float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def png_info(parameters: dict) -> PngInfo:
    """PNG text chunks: `parameters` as JSON (`cones2`), the prompt on its own for image viewers, and
    the A1111-style `parameters` text other tools read (`cones2.provenance`)."""
    from .provenance import a1111_parameters

    info = PngInfo()
    info.add_text("cones2", json.dumps(parameters, sort_keys=True))
    if "prompt" in parameters:
        info.add_text("prompt", str(parameters["prompt"]))
        info.add_itxt("parameters", a1111_parameters(parameters))
    return info


PREVIEW_MIN_SIDE = 256


def draw_layout(image: Image.Image, masks: dict[str, torch.Tensor],
                outlines: dict[str, torch.Tensor] | None = None) -> Image.Image:
    """The image with each subject's region tinted in its own colour, outlined (the bounding box of
    `outlines[name]`, default the mask itself) and labelled.
    Small images are enlarged (nearest, integer factor) so labels stay readable."""
    factor = max(1, -(-PREVIEW_MIN_SIDE // min(image.size)))
    base = image.convert("RGBA").resize((image.width * factor, image.height * factor), Image.NEAREST)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for idx, (name, mask) in enumerate(masks.items()):
        color = PREVIEW_COLORS[idx % len(PREVIEW_COLORS)]
        m = _at_size(mask, base.size)
        tint = np.zeros((*m.shape, 4), dtype=np.uint8)
        tint[m] = (*color, 60)
        overlay = Image.alpha_composite(overlay, Image.fromarray(tint, "RGBA"))
        draw = ImageDraw.Draw(overlay)
        edge = _at_size(outlines[name], base.size) if outlines is not None else m
        if not edge.any():
            continue
        ys, xs = np.nonzero(edge)
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        draw.rectangle(box, outline=(*color, 255), width=max(1, base.width // 128))
        draw.text((box[0] + 2, box[1] + 1), name, fill=(*color, 255))
    return Image.alpha_composite(base, overlay).convert("RGB")


def _at_size(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized (nearest) to `size` (width, height)."""
    m = mask.numpy()
    if m.shape != (size[1], size[0]):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    return m


PREVIEW_CANVAS = (128, 128, 128)


def layout_preview(masks: dict[str, torch.Tensor], grid_masks: dict[str, torch.Tensor]) -> Image.Image:
    """The layout alone on a grey canvas of the output size: each region tinted where the latent grid
    sees it (`Layout.grid_masks`, cells shown as blocks) and outlined where it was drawn."""
    height, width = next(iter(masks.values())).shape
    canvas = Image.new("RGB", (width, height), PREVIEW_CANVAS)
    seen = {name: torch.from_numpy(np.asarray(Image.fromarray(g.numpy().astype(np.uint8) * 255)
                                              .resize((width, height), Image.NEAREST)) > 0)
            for name, g in grid_masks.items()}
    return draw_layout(canvas, seen, outlines=masks)
