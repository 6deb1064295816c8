"""Layouts: where each subject goes, and the per-level attention weight maps (SPEC section 3).

A layout is a region mask plus a strength w+ per subject, built from boxes, binary masks or a
flat-colour image with a colour -> (subject, strength) table. `weight_maps` turns it into
W[pixel, token] for every attention resolution, exactly as the SPEC says: each subject's
{w+ inside, w- outside} map at the output image's size, resized *directly* to each level
(bilinear, aligned corners), flattened row-major, added at the subject's token positions.
`resize="cell-centres"` is the one opt-in deviation (LAYOUT_RESIZES).
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import limits
from .errors import Cones2Error, quote
from .limits import LAYOUT_RESIZES
from .names import did_you_mean

DEFAULT_STRENGTH = 2.5


@dataclass(frozen=True)
class Region:
    """One subject's region: a normalised box (x0, y0, x1, y1), a pixel box, or a bool mask (H, W)."""

    strength: float
    box: tuple[float, float, float, float] | None = None
    pixel_box: tuple[int, int, int, int] | None = None
    mask: torch.Tensor | None = None

    def raster(self, height: int, width: int, field: str) -> torch.Tensor:
        """The region as a bool mask (height, width) at the output image size."""
        if self.mask is not None:
            m = self.mask
            if tuple(m.shape) != (height, width):  # nearest keeps a binary mask binary
                m = F.interpolate(m[None, None].float(), size=(height, width), mode="nearest")[0, 0] > 0.5
        else:
            if self.box is not None:
                x0, y0, x1, y1 = self.box
                c0, r0, c1, r1 = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
            else:
                c0, r0, c1, r1 = self.pixel_box
                if c1 > width or r1 > height:
                    raise Cones2Error(f"pixel box {self.pixel_box} lies outside the {width}x{height} image", field)
            m = torch.zeros(height, width, dtype=torch.bool)
            m[r0:r1, c0:c1] = True
        if not m.any():
            raise Cones2Error(f"region is empty at {width}x{height}", field)
        return m


class Layout:
    """Subject name -> Region. Build with `from_boxes`, `from_masks` or `from_color_map`.

    Bounds (`cones2.limits`): 1 to 8 subjects, names of at most 100 characters, strengths w+ finite
    in [0, 1e4] (default 2.5), normalised box coordinates in [0, 1], pixel coordinates and mask sides
    at most 4096, at most 64 colour-table entries.
    """

    def __init__(self, regions: Mapping[str, Region], color_map_sha256: str | None = None):
        if not regions:
            raise Cones2Error("needs at least one subject region", "layout")
        _check_count(len(regions))
        for name in regions:
            limits.name(name, "layout")
        self.regions = dict(regions)
        self.color_map_sha256 = color_map_sha256   # the image a colour-map layout came from

    def describe(self) -> dict:
        """The geometry as JSON-ready data (PNG metadata): per subject its strength and its box, pixel
        box or mask (a 1-bit PNG, base64, with its sha256). `from_description` rebuilds the layout."""
        regions = {}
        for name, r in self.regions.items():
            entry: dict = {"strength": r.strength}
            if r.box is not None:
                entry["box"] = list(r.box)
            elif r.pixel_box is not None:
                entry["pixel_box"] = list(r.pixel_box)
            else:
                entry["mask_png"], entry["mask_sha256"] = _mask_to_text(r.mask), mask_sha256(r.mask)
            regions[name] = entry
        described = {"regions": regions}
        if self.color_map_sha256:
            described["color_map_sha256"] = self.color_map_sha256
        return described

    @classmethod
    def from_description(cls, data, field: str = "layout") -> "Layout":
        """The layout `describe` wrote (read back from a PNG); every value is checked again."""
        regions_data = data.get("regions") if isinstance(data, Mapping) else None
        if not isinstance(regions_data, Mapping) or not regions_data:
            raise Cones2Error("has no regions", field)
        regions = {}
        for name, entry in regions_data.items():
            where = f"{field}.{name}"
            if not isinstance(entry, Mapping):
                raise Cones2Error(f"must be an object, got {quote(entry)}", where)
            strength = {name: entry.get("strength", DEFAULT_STRENGTH)}
            if "box" in entry:
                one = cls.from_boxes({name: entry["box"]}, strength)
            elif "pixel_box" in entry:
                one = cls.from_boxes({name: entry["pixel_box"]}, strength, units="pixels")
            elif "mask_png" in entry:
                mask = _mask_from_text(entry["mask_png"], where)
                if entry.get("mask_sha256") not in (None, mask_sha256(mask)):
                    raise Cones2Error("mask does not match its recorded sha256", where)
                one = cls.from_masks({name: mask}, strength)
            else:
                raise Cones2Error("needs a box, pixel_box or mask_png", where)
            regions[name] = one.regions[name]
        return cls(regions, data.get("color_map_sha256"))

    def __repr__(self) -> str:
        return f"Layout({', '.join(f'{n}@{r.strength:g}' for n, r in self.regions.items())})"

    @property
    def names(self) -> list[str]:
        return list(self.regions)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_boxes(cls, boxes: Mapping[str, Sequence[float]], strengths: float | Mapping[str, float] = DEFAULT_STRENGTH,
                   units: str = "normalized") -> "Layout":
        """Boxes (x0, y0, x1, y1) per subject, in [0, 1] (`units="normalized"`) or output pixels."""
        if units not in ("normalized", "pixels"):
            raise Cones2Error(f"must be 'normalized' or 'pixels', got {quote(units)}", "layout.units")
        _check_count(len(boxes))
        _check_strength_names(strengths, boxes, "layout.strengths")
        regions = {}
        for name, box in boxes.items():
            field = f"layout.boxes.{limits.name(name, 'layout.boxes')}"
            try:
                vals = [float(v) for v in box]
            except (TypeError, ValueError, OverflowError):
                raise Cones2Error(f"must be 4 numbers x0,y0,x1,y1, got {quote(box)}", field) from None
            if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
                raise Cones2Error(f"must be 4 finite numbers x0,y0,x1,y1, got {quote(box)}", field)
            x0, y0, x1, y1 = vals
            if not (x0 < x1 and y0 < y1):
                raise Cones2Error(f"is inverted or empty (need x0 < x1 and y0 < y1), got {vals}", field)
            strength = _strength(strengths, name)
            if units == "normalized":
                if min(vals) < 0 or max(vals) > 1:
                    raise Cones2Error(f"normalised coordinates must lie in [0, 1], got {vals}", field)
                regions[name] = Region(strength, box=(x0, y0, x1, y1))
            else:
                if min(vals) < 0 or max(vals) > limits.MAX_SIDE or any(v != int(v) for v in vals):
                    raise Cones2Error(f"pixel coordinates must be integers in [0, {limits.MAX_SIDE}], got {vals}",
                                      field)
                regions[name] = Region(strength, pixel_box=tuple(int(v) for v in vals))
        return cls(regions)

    @classmethod
    def from_masks(cls, masks: Mapping[str, object], strengths: float | Mapping[str, float] = DEFAULT_STRENGTH) -> "Layout":
        """Binary masks (H, W) per subject: numpy/torch arrays or PIL images (non-zero = inside)."""
        _check_count(len(masks))
        _check_strength_names(strengths, masks, "layout.strengths")
        regions = {}
        for name, mask in masks.items():
            field = f"layout.masks.{limits.name(name, 'layout.masks')}"
            arr = np.asarray(mask)
            if arr.ndim == 3:
                arr = arr.any(axis=-1)
            if arr.ndim != 2 or arr.size == 0:
                raise Cones2Error(f"must be a 2-D mask, got shape {quote(arr.shape)}", field)
            if max(arr.shape) > limits.MAX_SIDE:
                raise Cones2Error(f"mask sides must be at most {limits.MAX_SIDE}, got {arr.shape}", field)
            m = torch.from_numpy(arr.astype(bool))
            if not m.any():
                raise Cones2Error("mask is empty", field)
            regions[name] = Region(_strength(strengths, name), mask=m)
        return cls(regions)

    @classmethod
    def from_color_map(cls, image, table: Mapping[object, Sequence]) -> "Layout":
        """A flat-colour image (path, PIL image or (H, W, 3) uint8 array) and a table
        colour -> (subject, strength); colours as (r, g, b), "r,g,b" or "#rrggbb".
        Pixels match a colour exactly (the reference's rule); every colour must be present."""
        if len(table) > limits.MAX_LAYOUT_COLORS:
            raise Cones2Error(f"{len(table)} colours; at most {limits.MAX_LAYOUT_COLORS}", "layout.colors")
        arr = _load_rgb(image)
        image_sha256 = hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()
        masks: dict[str, torch.Tensor] = {}
        strengths: dict[str, float] = {}
        for key, entry in table.items():
            rgb = parse_color(key)
            field = "layout.colors.{},{},{}".format(*rgb)
            try:
                name, strength = entry
            except (TypeError, ValueError):
                raise Cones2Error(f"must map to [subject, strength], got {quote(entry)}", field) from None
            name = limits.name(name, field)
            strength = _strength(strength, name, field)
            m = torch.from_numpy((arr == np.array(rgb, dtype=np.uint8)).all(axis=-1))
            if not m.any():
                raise Cones2Error(f"colour {rgb} does not occur in the layout image", field)
            if name in masks:
                if strengths[name] != strength:
                    raise Cones2Error(f"subject {name!r} has two colours with different strengths", field)
                m = m | masks[name]
            masks[str(name)], strengths[str(name)] = m, strength
        return cls({n: Region(strengths[n], mask=m) for n, m in masks.items()}, image_sha256)

    # ---- rasterising ---------------------------------------------------------------------------
    def masks(self, height: int, width: int) -> dict[str, torch.Tensor]:
        """Each subject's region as a bool mask (height, width)."""
        return {n: r.raster(height, width, f"layout.{n}") for n, r in self.regions.items()}

    def grid_masks(self, height: int, width: int, grid: tuple[int, int], negative_weight: float,
                   resize: str = "aligned-corners") -> dict[str, torch.Tensor]:
        """Each region as a latent grid of `grid` (h, w) cells sees it: the cells whose SPEC 3 weight
        (the {w+, w-} map resized like `weight_maps` does) is positive, as bool (h, w) masks."""
        seen = {}
        for name, region in self.regions.items():
            full = torch.where(region.raster(height, width, f"layout.{name}"), region.strength, negative_weight)
            level = F.interpolate(full.to(torch.float32)[None, None], size=grid, mode="bilinear",
                                  align_corners=resize == "aligned-corners")[0, 0]
            seen[name] = level > 0
        return seen

    def weight_maps(self, subject_positions: Mapping[str, Sequence[int]], height: int, width: int,
                    level_shapes: Sequence[tuple[int, int]], negative_weight: float, seq_len: int = 77,
                    device: torch.device | str = "cpu", resize: str = "aligned-corners") -> dict[int, torch.Tensor]:
        """W (h*w, seq_len) float32 for each level (h, w), keyed by h*w (SPEC 3).

        subject_positions: every token position of every occurrence of each subject's word.
        Tokens of no subject get 0; coinciding subjects' maps add. resize: one of LAYOUT_RESIZES.
        """
        if resize not in LAYOUT_RESIZES:
            raise Cones2Error(f"must be one of {', '.join(LAYOUT_RESIZES)}, got {quote(resize)}", "layout_resize")
        names, full = [], []
        for name, region in self.regions.items():
            if not list(subject_positions.get(name, ())):
                raise Cones2Error(f"layout subject {name!r} does not occur in the prompt", f"layout.{name}")
            inside = region.raster(height, width, f"layout.{name}")
            full.append(torch.where(inside, region.strength, negative_weight).to(torch.float32))
            names.append(name)
        full_maps = torch.stack(full)[None].to(device)              # (1, J, H, W)
        maps = {}
        for h, w in level_shapes:
            level = F.interpolate(full_maps, size=(h, w), mode="bilinear",
                                  align_corners=resize == "aligned-corners")[0]
            per_subject = level.reshape(len(names), h * w)           # (J, h*w), row-major pixels
            W = torch.zeros(h * w, seq_len, dtype=torch.float32, device=device)
            for j, name in enumerate(names):                          # coinciding subjects' maps add
                W[:, list(subject_positions[name])] += per_subject[j, :, None]
            maps[h * w] = W
        return maps


def level_shapes(latent_height: int, latent_width: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of a UNet's attention resolutions, finest first: each of its `levels` down blocks halves
    the latent (rounding up). What `Layout.weight_maps` resizes each subject's map to."""
    shapes, h, w = [], latent_height, latent_width
    for _ in range(levels):
        shapes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return shapes


def parse_color(key) -> tuple[int, int, int]:
    """(r, g, b) from a tuple, "r,g,b" or "#rrggbb"."""
    try:
        if isinstance(key, str):
            key = key.strip()
            if key.startswith("#") and len(key) == 7:
                rgb = tuple(int(key[i : i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(v) for v in key.split(","))
        else:
            rgb = tuple(int(v) for v in key)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise Cones2Error(f"colour must be 'r,g,b' with 0..255 values or '#rrggbb', got {quote(key)}",
                          "layout.colors")
    return rgb


def _strength(strengths, name: str, field: str | None = None) -> float:
    """w+ of subject `name`: finite, in `limits.STRENGTH`."""
    value = strengths.get(name, DEFAULT_STRENGTH) if isinstance(strengths, Mapping) else strengths
    return limits.number(value, field or f"layout.strengths.{name}", limits.STRENGTH)


def _check_strength_names(strengths, regions: Mapping, field: str) -> None:
    """A strength for a subject that has no region would be silently dropped: refuse it."""
    if not isinstance(strengths, Mapping):
        return
    for name in strengths:
        if name not in regions:
            raise Cones2Error(f"strength given for {quote(name)}, which has no region"
                              f"{did_you_mean(str(name), regions)}", field)


def _check_count(count: int) -> None:
    if count > limits.MAX_SUBJECTS:
        raise Cones2Error(f"{count} subjects; at most {limits.MAX_SUBJECTS} per image", "layout")


def mask_sha256(mask) -> str:
    """sha256 of a bool mask's shape and packed bits (identifies a mask or colour-map region)."""
    arr = np.asarray(mask, dtype=bool)
    return hashlib.sha256(str(arr.shape).encode() + np.packbits(arr).tobytes()).hexdigest()


def _mask_to_text(mask: torch.Tensor) -> str:
    """A bool mask as a base64 1-bit PNG (a few hundred bytes for a typical region)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mask_from_text(text, field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(str(text), validate=True))) as im:
            size = im.size
            if max(size) <= limits.MAX_SIDE:
                return np.asarray(im.convert("1"), dtype=bool)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise Cones2Error(f"mask_png is not a base64 PNG ({type(exc).__name__})", field) from None
    raise Cones2Error(f"mask sides must be at most {limits.MAX_SIDE}, got {size}", field)


def _load_rgb(image) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise Cones2Error(f"cannot read layout image {image}: {exc}", "layout.image") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 3 or arr.dtype != np.uint8:
        raise Cones2Error(f"must be an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}", "layout.image")
    return arr[..., :3]
