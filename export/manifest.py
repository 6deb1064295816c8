"""`manifest.json`: what an export (or a TensorRT build) directory holds, and the checks that it
fits the engine loading it.

Export, build and run are separate steps that talk through files (TensorRT demo style): the
manifest records every model's file, input/output names, dtypes and symbolic shapes, the opset,
the checkpoint's id (`Engine.components.model_id`), the project version, the UNet's attention
levels (one weight input each) and the parity numbers measured when it was written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cones2.errors import Cones2Error
from cones2.outputs import output_folder

from .contracts import ModelFacts

MANIFEST = "manifest.json"
FORMAT = 1


def write_manifest(directory: str | os.PathLike, data: dict) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: str | os.PathLike, field: str, kind: str = "onnx") -> dict:
    """The manifest of an export (`kind="onnx"`) or TensorRT build (`kind="tensorrt"`) directory;
    a Cones2Error naming `field` when it is missing, unreadable or of another kind."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise Cones2Error(f"directory not found: {directory}", field)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Cones2Error(f"{directory} has no {MANIFEST}; create it with `cones2-engine export {kind}`", field) from None
    except (OSError, ValueError) as exc:
        raise Cones2Error(f"cannot read {path}: {exc}", field) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != kind:
        raise Cones2Error(f"{path} is not a cones2 {kind} manifest of format {FORMAT}", field)
    for name, entry in data.get("models", {}).items():
        file = Path(directory) / entry.get("file", "")
        if not file.is_file():
            raise Cones2Error(f"the {name} file {file} listed in {MANIFEST} is missing", field)
    return data


def facts(manifest: dict) -> ModelFacts:
    return ModelFacts.from_dict(manifest["facts"])


def check_engine(manifest: dict, engine, field: str) -> None:
    """The export must come from the checkpoint the engine loaded (same model id)."""
    if manifest.get("model_id") != engine.components.model_id:
        raise Cones2Error(f"was exported from model {manifest.get('model_id')!r}, but the engine loaded "
                          f"{engine.components.model_id!r}; export this model or load that one", field)


def check_size(manifest: dict, height: int, width: int, field: str) -> None:
    """A static-shape export runs at its size only."""
    static = manifest.get("static_shape")
    if static and (height, width) != tuple(static):
        raise Cones2Error(f"was exported for {static[0]}x{static[1]} only, got {height}x{width}", field)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Before any work: `out` is new, empty or `overwrite` is given, and a folder can be written
    beside it (the export is built there and renamed into place by `cones2.atomic.atomic_directory`)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise Cones2Error(f"{out} exists and is not empty (pass --overwrite to replace it)", "out")
    if out.exists() and not out.is_dir():
        output_folder(out.parent, "out")        # --overwrite replaces a file: its folder takes the new one
    else:
        output_folder(out, "out", replaced=True)
