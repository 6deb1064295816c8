"""GenerateRequest (proto) -> `cones2.GenerationRequest`, checked once at the edge, before queueing.

The message's counts and sizes are bounded first (before anything is copied or decoded); then the
request is built from the public API (`SamplingConfig`, `Layout`, `GenerationRequest`, which check
every value's range) and `Engine.check` checks it against the model (subject words in the prompt,
residual rows, regions visible at the size). So a bad request never joins a batch. Errors are
`Cones2Error`s naming the proto path (`subjects[0].residual_id`, `layout.boxes.dog`, `steps`).
"""
from __future__ import annotations

import io
import secrets
import struct
import threading
from dataclasses import dataclass

from .. import Cones2Error, GenerationRequest, Layout, Residual, SamplingConfig, get_mode, mode_names
from ..errors import quote
from ..limits import MAX_LAYOUT_COLORS as MAX_COLOR_ENTRIES
from ..limits import MAX_POSITIONS
from . import cones2_pb2 as pb
from .residual_store import ResidualStore

# Shape bounds checked on the raw message, before a copy is made: a 32 MB message must not expand
# into gigabytes of Python objects. Positions and colour entries use the engine's own bounds
# (`cones2.limits`); a colour string is the service's own.
MAX_COLOR_CHARS = 32
DEFAULT_MAX_LAYOUT_PIXELS = 2048 * 2048

# Colour maps are decoded at most this many at a time, so concurrent requests cannot stack their
# decoding memory (a few copies of 3-4 bytes per pixel each, transiently).
_DECODE_SLOTS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class Limits:
    """Per-request limits of a server (the `serve` flags).

    max_layout_pixels: largest colour map, width x height, read from the PNG header before decoding
    (PIL then holds at most 4 bytes per pixel: 16 MiB at the default 2048 x 2048).
    """

    max_subjects: int = 8
    max_resolution: int = 1024
    max_steps: int = 150
    max_residual_bytes: int = 1 << 20
    max_layout_png_bytes: int = 4 << 20
    max_layout_pixels: int = DEFAULT_MAX_LAYOUT_PIXELS

    def __post_init__(self):
        for name in ("max_subjects", "max_steps", "max_residual_bytes", "max_layout_png_bytes", "max_layout_pixels"):
            if int(getattr(self, name)) < 1:
                raise Cones2Error(f"must be >= 1, got {getattr(self, name)}", name)
        if self.max_resolution < 64:
            raise Cones2Error(f"must be >= 64, got {self.max_resolution}", "max_resolution")


@dataclass(frozen=True)
class ValidatedRequest:
    """A request ready for the worker, plus how to return its result."""

    request: GenerationRequest
    output_format: str         # "png" or "latents"
    preview_every: int
    located: list | None = None    # `Engine.check`'s answer: the worker neither tokenizes nor searches the prompt again


_FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "png", pb.OUTPUT_FORMAT_PNG: "png", pb.OUTPUT_FORMAT_LATENTS: "latents"}
# From the mode table (`cones2.modes`): each mode's wire name; UNSPECIFIED means the default (listed first).
_MODES = {pb.SAMPLING_MODE_UNSPECIFIED: mode_names()[0]} | {pb.SamplingMode.Value(get_mode(n).proto): n
                                                            for n in mode_names()}
_RESIZES = {pb.LAYOUT_RESIZE_UNSPECIFIED: "aligned-corners", pb.LAYOUT_RESIZE_ALIGNED_CORNERS: "aligned-corners",
            pb.LAYOUT_RESIZE_CELL_CENTRES: "cell-centres"}


def validate(msg: pb.GenerateRequest, engine, store: ResidualStore, limits: Limits) -> ValidatedRequest:
    """Check `msg` against `limits` and the model (`engine.check`); the request the worker will run."""
    if msg.output_format not in _FORMATS:
        raise Cones2Error(f"unknown output format {msg.output_format}", "output_format")
    if msg.mode not in _MODES:
        raise Cones2Error(f"unknown sampling mode {msg.mode}", "mode")
    if msg.layout_resize not in _RESIZES:
        raise Cones2Error(f"unknown layout resize rule {msg.layout_resize}", "layout_resize")
    if msg.preview_every < 0:
        raise Cones2Error(f"must be >= 0, got {msg.preview_every}", "preview_every")
    _check_shape(msg, limits)
    config = _config(msg, engine, limits)
    subjects, positions = _subjects(msg, engine, store)
    layout = _layout(msg, limits) if msg.HasField("layout") else None
    names = set(subjects) | set(layout.names if layout else ())
    if len(names) > limits.max_subjects:
        raise Cones2Error(f"{len(names)} subjects; this server allows at most {limits.max_subjects}", "subjects")
    # HTTP/JSON and Ray carry the same message (json_format mapping), so this is every transport's mapping.
    request = GenerationRequest(msg.prompt, subjects, layout, config, positions or None,
                                negative_prompt=msg.negative_prompt)  # checks both prompts
    located = engine.check(request)
    return ValidatedRequest(request, _FORMATS[msg.output_format], msg.preview_every, located)


def _check_shape(msg: pb.GenerateRequest, limits: Limits) -> None:
    """Counts of repeated fields, before any of them is copied."""
    if len(msg.subjects) > limits.max_subjects:
        raise Cones2Error(f"{len(msg.subjects)} subjects; this server allows at most {limits.max_subjects}",
                          "subjects")
    for i, s in enumerate(msg.subjects):
        if len(s.positions) > MAX_POSITIONS:
            raise Cones2Error(f"{len(s.positions)} positions; a prompt has {MAX_POSITIONS} token slots",
                              f"subjects[{i}].positions")
    spec = msg.layout
    if len(spec.boxes) > limits.max_subjects:
        raise Cones2Error(f"{len(spec.boxes)} boxes; this server allows at most {limits.max_subjects} subjects",
                          "layout.boxes")
    if len(spec.color_map.entries) > MAX_COLOR_ENTRIES:
        raise Cones2Error(f"{len(spec.color_map.entries)} entries; at most {MAX_COLOR_ENTRIES}",
                          "layout.color_map.entries")


def _config(msg: pb.GenerateRequest, engine, limits: Limits) -> SamplingConfig:
    """SamplingConfig checks every value's type and range; the server's own limits come first."""
    size = min(engine.default_resolution, limits.max_resolution)
    settings = {"height": msg.height if msg.HasField("height") else size,
                "width": msg.width if msg.HasField("width") else size}
    for side in ("height", "width"):
        if settings[side] > limits.max_resolution:
            raise Cones2Error(f"{settings[side]} is over this server's limit of {limits.max_resolution}", side)
    if msg.HasField("steps"):
        if not 1 <= msg.steps <= limits.max_steps:
            raise Cones2Error(f"must be in [1, {limits.max_steps}], got {msg.steps}", "steps")
        settings["steps"] = msg.steps
    for name in ("guidance_steps", "guidance_weight", "cfg_scale", "negative_weight"):
        if msg.HasField(name):
            settings[name] = getattr(msg, name)
    settings["seed"] = msg.seed if msg.HasField("seed") else secrets.randbelow(2**63)
    settings["mode"] = _MODES[msg.mode]
    settings["layout_resize"] = _RESIZES[msg.layout_resize]
    return SamplingConfig(**settings)


def _subjects(msg: pb.GenerateRequest, engine, store: ResidualStore) -> tuple[dict[str, Residual], dict[str, list[int]]]:
    subjects: dict[str, Residual] = {}
    positions: dict[str, list[int]] = {}
    for i, s in enumerate(msg.subjects):
        where = f"subjects[{i}]"
        name = s.name.strip()
        if not name:
            raise Cones2Error("must be a word of the prompt", f"{where}.name")
        if name in subjects:
            raise Cones2Error(f"subject {quote(name)} is given twice", f"{where}.name")
        kind = s.WhichOneof("residual")
        if kind == "residual_id":
            residual = store.get(s.residual_id, f"{where}.residual_id")
            residual.check_dim(engine.text_dim, f"{where}.residual_id")
        elif kind == "residual_safetensors":
            residual = store.parse_upload(s.residual_safetensors, f"{where}.residual_safetensors")
        else:
            raise Cones2Error("give residual_id or residual_safetensors", f"{where}.residual")
        subjects[name] = residual
        if s.positions:
            positions[name] = list(s.positions)
    return subjects, positions


def _layout(msg: pb.GenerateRequest, limits: Limits) -> Layout | None:
    spec = msg.layout
    has_map = spec.HasField("color_map")
    if spec.boxes and has_map:
        raise Cones2Error("give boxes or color_map, not both", "layout")
    if spec.boxes:
        boxes, strengths = {}, {}
        for i, box in enumerate(spec.boxes):
            name = box.subject.strip()
            if not name:
                raise Cones2Error("must name a subject word of the prompt", f"layout.boxes[{i}].subject")
            if name in boxes:
                raise Cones2Error(f"subject {quote(name)} has two boxes", f"layout.boxes[{i}].subject")
            boxes[name] = (box.x0, box.y0, box.x1, box.y1)
            if box.HasField("strength"):
                strengths[name] = box.strength
        return Layout.from_boxes(boxes, strengths)   # checks names, [0, 1], inverted, NaN, strength ranges
    if has_map:
        return _color_layout(spec.color_map, limits)
    return None


def _color_layout(spec: pb.ColorMap, limits: Limits) -> Layout:
    from PIL import Image

    if not spec.entries:
        raise Cones2Error("needs at least one colour -> subject entry", "layout.color_map.entries")
    table = {}
    for i, e in enumerate(spec.entries):
        if not e.subject.strip():
            raise Cones2Error("must name a subject word of the prompt", f"layout.color_map.entries[{i}].subject")
        if not e.color.strip() or len(e.color) > MAX_COLOR_CHARS:
            raise Cones2Error(f"must be 'r,g,b' or '#rrggbb', got {quote(e.color)}",
                              f"layout.color_map.entries[{i}].color")
        table[e.color] = (e.subject.strip(), e.strength if e.HasField("strength") else 2.5)
    field = "layout.color_map.png"
    if len(spec.png) > limits.max_layout_png_bytes:
        raise Cones2Error(f"{len(spec.png)} bytes exceeds the limit of {limits.max_layout_png_bytes} bytes", field)
    png, width, height = pixel_chunks(spec.png, field)
    if width * height > limits.max_layout_pixels:
        raise Cones2Error(f"{width}x{height} is over this server's limit of {limits.max_layout_pixels} pixels", field)
    with _DECODE_SLOTS:
        try:
            with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
                rgb = im.convert("RGB")
        except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
            raise Cones2Error(f"is a PNG that does not decode ({quote(str(exc))})", field) from None
        return Layout.from_color_map(rgb, table)   # checks each colour occurs in the image, naming it


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}


def pixel_chunks(png: bytes, field: str) -> tuple[bytes, int, int]:
    """The PNG reduced to the chunks that define its pixels, and its width and height (from IHDR).

    Text and profile chunks are dropped unread: PIL would inflate them (up to 64 MiB per image) when
    opening the file. Truncated data is left for the decoder to report."""
    if not png.startswith(_PNG_SIGNATURE):
        raise Cones2Error("is not a PNG image", field)
    if len(png) < 33 or png[12:16] != b"IHDR":
        raise Cones2Error("is a PNG without its IHDR header", field)
    width, height = struct.unpack(">II", png[16:24])
    if width == 0 or height == 0:
        raise Cones2Error(f"is a PNG of {width}x{height} pixels", field)
    kept, pos = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while pos + 12 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, end = png[pos + 4 : pos + 8], pos + 12 + length
        if kind in _PIXEL_CHUNKS:
            kept.append(png[pos:end])
        if kind == b"IEND" or end > len(png):
            break
        pos = end
    return b"".join(kept), width, height
