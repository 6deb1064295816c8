"""GenerateRequest (proto) -> `cones2.GenerationRequest`, checked once at the edge.

Every check that could fail later inside the worker (subject not in the prompt, residual rows
longer than the word, a box that vanishes at the chosen resolution) is done here, in the caller's
thread, so a bad request never reaches a batch and never costs other requests anything. Errors are
`Cones2Error`s whose field names the proto path (`subjects[0].residual_id`, `layout.boxes.dog`,
`steps`), which the server maps to INVALID_ARGUMENT.
"""
from __future__ import annotations

import io
import secrets
from dataclasses import dataclass

from ..config import SamplingConfig
from ..engine import MAX_PROMPT_CHARS, GenerationRequest
from ..errors import Cones2Error
from ..layout import Layout
from ..residual import Residual
from ..tokens import locate_subject, prompt_token_ids
from . import cones2_pb2 as pb
from .residual_store import ResidualStore

MAX_COLOR_MAP_SIDE = 4096


@dataclass(frozen=True)
class Limits:
    """Per-request limits of a server (the `serve` flags)."""

    max_subjects: int = 8
    max_resolution: int = 1024
    max_steps: int = 150
    max_residual_bytes: int = 1 << 20
    max_layout_png_bytes: int = 4 << 20

    def __post_init__(self):
        for name in ("max_subjects", "max_steps", "max_residual_bytes", "max_layout_png_bytes"):
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


_FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "png", pb.OUTPUT_FORMAT_PNG: "png", pb.OUTPUT_FORMAT_LATENTS: "latents"}
_MODES = {pb.SAMPLING_MODE_UNSPECIFIED: "paper-exact", pb.SAMPLING_MODE_PAPER_EXACT: "paper-exact",
          pb.SAMPLING_MODE_FAST: "fast"}


class ThreadSafeTokenizer:
    """A private copy of the engine's tokenizer, one call at a time.

    Hugging Face tokenizers are not safe to call from several threads (fast tokenizers mutate their
    padding/truncation state per call), and the worker thread uses the engine's own tokenizer while
    the RPC threads validate, so validation gets its own copy behind a lock.
    """

    def __init__(self, tokenizer):
        import copy
        import threading

        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def validate(msg: pb.GenerateRequest, engine, store: ResidualStore, limits: Limits,
             tokenizer: ThreadSafeTokenizer | None = None) -> ValidatedRequest:
    """Check `msg` against the model (`engine`: text_dim, default_resolution) and `limits`.

    tokenizer: what to tokenize with (default: the engine's own, only safe off the worker thread).
    """
    prompt = msg.prompt
    if not prompt.strip():
        raise Cones2Error("must be a non-empty string", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise Cones2Error(f"is longer than {MAX_PROMPT_CHARS} characters", "prompt")
    config = _config(msg, engine, limits)
    subjects, positions = _subjects(msg, engine, store, limits)
    layout = _layout(msg, limits) if msg.HasField("layout") else None
    names = set(subjects) | set(layout.names if layout else ())
    if len(names) > limits.max_subjects:
        raise Cones2Error(f"{len(names)} subjects; this server allows at most {limits.max_subjects}", "subjects")
    _check_against_prompt(tokenizer or engine.tokenizer, prompt, subjects, positions, layout, config)
    request = GenerationRequest(prompt, subjects, layout, config, positions or None)
    if msg.output_format not in _FORMATS:
        raise Cones2Error(f"unknown output format {msg.output_format}", "output_format")
    if msg.preview_every < 0:
        raise Cones2Error(f"must be >= 0, got {msg.preview_every}", "preview_every")
    return ValidatedRequest(request, _FORMATS[msg.output_format], msg.preview_every)


def _config(msg: pb.GenerateRequest, engine, limits: Limits) -> SamplingConfig:
    size = engine.default_resolution
    settings = {"height": msg.height if msg.HasField("height") else min(size, limits.max_resolution),
                "width": msg.width if msg.HasField("width") else min(size, limits.max_resolution)}
    for side in ("height", "width"):
        if settings[side] > limits.max_resolution:
            raise Cones2Error(f"{settings[side]} is over this server's limit of {limits.max_resolution}", side)
    if msg.HasField("steps"):
        if not 1 <= msg.steps <= limits.max_steps:
            raise Cones2Error(f"must be in [1, {limits.max_steps}], got {msg.steps}", "steps")
        settings["steps"] = msg.steps
    if msg.HasField("guidance_steps"):
        if msg.guidance_steps < 0:
            raise Cones2Error(f"must be >= 0, got {msg.guidance_steps}", "guidance_steps")
        settings["guidance_steps"] = msg.guidance_steps
    for name in ("guidance_weight", "cfg_scale", "negative_weight"):
        if msg.HasField(name):
            settings[name] = getattr(msg, name)   # SamplingConfig rejects NaN/inf, naming the field
    settings["seed"] = msg.seed if msg.HasField("seed") else secrets.randbelow(2**63)
    if msg.mode not in _MODES:
        raise Cones2Error(f"unknown sampling mode {msg.mode}", "mode")
    settings["mode"] = _MODES[msg.mode]
    return SamplingConfig(**settings)


def _subjects(msg: pb.GenerateRequest, engine, store: ResidualStore,
              limits: Limits) -> tuple[dict[str, Residual], dict[str, list[int]]]:
    if len(msg.subjects) > limits.max_subjects:
        raise Cones2Error(f"{len(msg.subjects)} subjects; this server allows at most {limits.max_subjects}",
                          "subjects")
    subjects: dict[str, Residual] = {}
    positions: dict[str, list[int]] = {}
    for i, s in enumerate(msg.subjects):
        where = f"subjects[{i}]"
        name = s.name.strip()
        if not name:
            raise Cones2Error("must be a word of the prompt", f"{where}.name")
        if name in subjects:
            raise Cones2Error(f"subject {name!r} is given twice", f"{where}.name")
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
                raise Cones2Error(f"subject {name!r} has two boxes", f"layout.boxes[{i}].subject")
            boxes[name] = (box.x0, box.y0, box.x1, box.y1)
            if box.HasField("strength"):
                strengths[name] = box.strength
        return Layout.from_boxes(boxes, strengths)   # checks [0, 1], inverted and NaN, naming the box
    if has_map:
        return _color_layout(spec.color_map, limits)
    return None


def _color_layout(spec: pb.ColorMap, limits: Limits) -> Layout:
    from PIL import Image

    if not spec.entries:
        raise Cones2Error("needs at least one colour -> subject entry", "layout.color_map.entries")
    if len(spec.png) > limits.max_layout_png_bytes:
        raise Cones2Error(f"{len(spec.png)} bytes exceeds the limit of {limits.max_layout_png_bytes} bytes",
                          "layout.color_map.png")
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(spec.png), formats=["PNG"]) as im:
            if max(im.size) > MAX_COLOR_MAP_SIDE:
                raise Cones2Error(f"{im.size[0]}x{im.size[1]} is larger than {MAX_COLOR_MAP_SIDE} pixels a side",
                                  "layout.color_map.png")
            rgb = im.convert("RGB")
    except Cones2Error:
        raise
    except UnidentifiedImageError:
        raise Cones2Error("is not a PNG image", "layout.color_map.png") from None
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise Cones2Error(f"is a PNG that does not decode ({exc})", "layout.color_map.png") from None
    table = {}
    for i, e in enumerate(spec.entries):
        if not e.subject.strip():
            raise Cones2Error("must name a subject word of the prompt", f"layout.color_map.entries[{i}].subject")
        if not e.color.strip():
            raise Cones2Error("must be 'r,g,b' or '#rrggbb'", f"layout.color_map.entries[{i}].color")
        table[e.color] = (e.subject.strip(), e.strength if e.HasField("strength") else 2.5)
    return Layout.from_color_map(rgb, table)   # checks each colour occurs in the image, naming it


def _check_against_prompt(tokenizer, prompt: str, subjects: dict[str, Residual], positions: dict[str, list[int]],
                          layout: Layout | None, config: SamplingConfig) -> None:
    """What Engine._prepare would reject, checked before the request joins a batch."""
    ids = prompt_token_ids(tokenizer, prompt)
    for name, residual in subjects.items():
        t = locate_subject(tokenizer, ids, name, positions.get(name))
        if name not in positions and residual.rows > len(t.token_ids):
            raise Cones2Error(f"residual has {residual.rows} rows but {name!r} has {len(t.token_ids)} tokens",
                              f"subjects.{name}")
    if layout is not None:
        for name in layout.names:
            locate_subject(tokenizer, ids, name, field="layout")   # raises if the word is absent
        layout.masks(config.height, config.width)   # a region that vanishes at this size is an error
