"""Instance images -> pixel tensors -> cached VAE latent distributions (SPEC 1.2).

The few images of a subject never change during training, so the VAE encodes each of them once;
each step then draws `x0 = (mean + std * eps) * scaling_factor` from the cached distribution, as a
fresh `vae.encode(img).latent_dist.sample()` would, without running the VAE again.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cones2 import Cones2Error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGES = 1000


def load_images(images, field: str = "images") -> list[Image.Image]:
    """A folder path, or a list of paths / PIL images -> RGB PIL images (EXIF rotation applied).

    Every unreadable file is named in one error; a folder without jpg/png/webp files is an error.
    """
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise Cones2Error(f"not a folder: {folder}", field)
        items = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise Cones2Error(f"no .jpg/.jpeg/.png/.webp images in {folder}", field)
    elif isinstance(images, (list, tuple)):
        items = list(images)
        if not items:
            raise Cones2Error("the list of images is empty", field)
    else:
        raise Cones2Error(f"expected a folder path or a list of images/paths, got {type(images).__name__}", field)
    if len(items) > MAX_IMAGES:
        raise Cones2Error(f"{len(items)} images; at most {MAX_IMAGES} (Cones 2 needs only a few)", field)
    loaded, bad = [], []
    for item in items:
        try:
            loaded.append(_to_rgb(item))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(f"{getattr(item, 'name', item)} ({type(exc).__name__})")
        except TypeError:
            raise Cones2Error(f"expected a path or a PIL image, got {type(item).__name__}", field) from None
    if bad:
        raise Cones2Error(f"cannot read {len(bad)} image file(s): {', '.join(str(b) for b in bad)}", field)
    return loaded


def _to_rgb(item) -> Image.Image:
    if isinstance(item, Image.Image):
        image = item.copy()
    elif isinstance(item, (str, os.PathLike)):
        with Image.open(item) as f:
            f.load()
            image = f.copy()
    else:
        raise TypeError(type(item).__name__)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))   # transparency -> white
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if min(image.size) < 1:
        raise ValueError("empty image")
    return image


def to_pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic), center crop -> (N, 3, R, R) float32 in [-1, 1]."""
    out = []
    for image in images:
        w, h = image.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))
    # contiguous NCHW: on the CPU the VAE's convolutions on a channels-last view (what the permute
    # gives) take a less exact path, 1e-3 off a float64 encoding where NCHW is 1e-6 off
    # (tests/test_train_step_reference.py found it)
    pixels = torch.stack(out).permute(0, 3, 1, 2).float().contiguous()
    return pixels / 127.5 - 1.0


def fingerprint(pixels: torch.Tensor) -> str:
    """sha256 of the preprocessed images (resume checks it is continuing on the same data)."""
    q = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return hashlib.sha256(q.contiguous().numpy().tobytes()).hexdigest()


@dataclass
class LatentCache:
    """The VAE posterior of each image: mean and std, (N, C, h, w) float32 on the training device."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, pixels: torch.Tensor, device: torch.device) -> "LatentCache":
        """Run the VAE encoder once per image (pixels (N, 3, R, R) in [-1, 1])."""
        means, stds = [], []
        for i in range(pixels.shape[0]):
            x = pixels[i : i + 1].to(device, vae.dtype)
            dist = vae.encode(x).latent_dist
            # contiguous: the VAE may hand back channels-last views, and the UNet's kernels (hence the
            # last bits of every step) depend on the layout; a resumed run must see the same one
            means.append(dist.mean.float().contiguous())
            stds.append(dist.std.float().contiguous())
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return cls(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), float(shift))

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x0 for the images `indices` (B,): a posterior sample, shifted and scaled, (B, C, h, w)."""
        mean, std = self.mean[indices], self.std[indices]
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor
