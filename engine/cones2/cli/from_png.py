"""`generate --from-png IMG`: the inputs an image of this engine recorded (`cones2.provenance`), read
back so the image can be made again. Residuals are found by file name and checked by sha256."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cones2Error, quote
from ..provenance import FORMAT

RESIDUAL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MAX_SCANNED_FILES = 1000
SETTINGS = ("seed", "steps", "guidance_steps", "guidance_weight", "cfg_scale", "negative_weight", "layout_resize")


@dataclass
class RecordedInputs:
    """What an image says produced it (values are checked again by the objects built from them)."""

    prompt: str
    negative_prompt: str
    subjects: dict
    positions: dict | None
    layout: object
    settings: dict = field(default_factory=dict)
    sides: tuple[int | None, int | None] = (None, None)
    mode: str | None = None
    model_source: str | None = None
    model_fingerprint: str | None = None
    model_name: str | None = None
    allow_foreign_residuals: bool = False
    backend: str | None = None


def read_recorded(png: str | Path, residual_dirs: list[str]) -> RecordedInputs:
    """The inputs recorded in `png`, with each residual loaded from `residual_dirs`, the PNG's folder
    or the recorded model's `residuals/` folder (whichever first holds a file of its sha256)."""
    from ..layout import Layout

    params = _read_params(Path(png))
    model_source = params.get("model_source") or None
    folders = [Path(d) for d in residual_dirs] + [Path(png).parent]
    if model_source:
        folders.append(Path(model_source) / "residuals")
    subjects = {name: _find_residual(name, entry, folders) for name, entry in (params.get("residuals") or {}).items()}
    layout = Layout.from_description(params["layout"], "from-png.layout") if params.get("layout") else None
    settings = {k: params[k] for k in SETTINGS if params.get(k) is not None}
    return RecordedInputs(
        prompt=params.get("prompt") or "", negative_prompt=params.get("negative_prompt") or "", subjects=subjects,
        positions=params.get("subject_positions") or None, layout=layout, settings=settings,
        sides=(params.get("height"), params.get("width")), mode=params.get("mode"), model_source=model_source,
        model_fingerprint=params.get("model_fingerprint") or None, model_name=params.get("model") or None,
        allow_foreign_residuals=bool(params.get("allow_foreign_residuals")), backend=params.get("backend") or None)


def recorded_backend(recorded: RecordedInputs, device: str) -> str | None:
    """The backend that made the image, when it can run here (the same backend gives the same pixels)."""
    from ..backends import backend_names, get_spec, why_unavailable
    from ..loading import parse_device

    name = recorded.backend        # one that needs a folder of its own (tensorrt) is left to the flags
    if name in backend_names() and not get_spec(name).needs and why_unavailable(name, parse_device(device)) is None:
        return name
    return None


def check_same_model(recorded: RecordedInputs, engine) -> None:
    """The image must be re-made on the weights that made it (its recorded fingerprint)."""
    if recorded.model_fingerprint and recorded.model_fingerprint != engine.fingerprint:
        raise Cones2Error(f"the image was made with model {recorded.model_name} (fingerprint "
                          f"{recorded.model_fingerprint}); {engine.components.model_id} has fingerprint "
                          f"{engine.fingerprint}", "from-png")


def _read_params(path: Path) -> dict:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("cones2")
    except FileNotFoundError:
        raise Cones2Error(f"file not found: {path}", "from-png") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise Cones2Error(f"cannot read {path} as an image: {exc}", "from-png") from None
    if not text:
        raise Cones2Error(f"{path} carries no cones2 metadata (not made by cones2-engine, or stripped)", "from-png")
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        raise Cones2Error(f"{path}: its cones2 metadata is not JSON", "from-png") from None
    if not isinstance(params, dict) or params.get("format") != FORMAT:
        raise Cones2Error(f"{path}: metadata format {quote(params.get('format') if isinstance(params, dict) else None)}"
                          f" is not {FORMAT} (made by an older cones2-engine: not re-runnable)", "from-png")
    return params


def _find_residual(name: str, entry, folders: list[Path]):
    """The residual file recorded for `name`: by file name first, then any residual file of that sha256."""
    from ..residual import MAX_FILE_BYTES, Residual

    field_name = f"from-png.residuals.{name}"
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise Cones2Error("has no sha256", field_name)
    file_name, digest = entry.get("file"), entry["sha256"]
    candidates = [d / Path(file_name).name for d in folders if file_name]
    for folder in folders:
        if folder.is_dir():
            candidates += sorted(p for p in folder.iterdir() if p.suffix in RESIDUAL_SUFFIXES)[:MAX_SCANNED_FILES]
    for path in candidates:
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES and _sha256(path) == digest:
            return Residual.load(path, field_name)
    where = ", ".join(str(d) for d in folders)
    raise Cones2Error(f"residual {file_name or '(in memory)'} with sha256 {digest[:12]}... is not in {where}; "
                      "pass --residual-dir DIR", field_name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
