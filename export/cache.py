"""The ONNX export the `onnxruntime` runner uses when it is given no `onnx_dir`: made from the loaded
engine on first use and kept in `cones2.cache_root()/onnx/`, one folder per model content.

`--backend onnxruntime` without `--onnx` runs on it (docs/speed.md section 4): the first engine of a model
pays one export (about 45 s for the demo model, minutes for SD 2.1), every later process loads the
graphs. The folder's key hashes the weights themselves (not a path or a config), the project and
torch versions and the opset, so a retrained or edited checkpoint never meets a stale graph. A file
lock makes concurrent first users (service workers) export once; the folder is written beside its
final place and renamed in, so an interrupted export leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
from pathlib import Path

import torch

import cones2
from cones2.default_model import cache_root
from cones2.errors import Cones2Error

from . import onnx_export
from .manifest import MANIFEST

log = logging.getLogger("cones2.export.cache")
CACHE_FOLDER = "onnx"
_THREADS = threading.Lock()   # file locks exclude other processes; this, other threads of this one


def weights_fingerprint(engine) -> str:
    """sha256 of every parameter and buffer of the UNet, text encoder and VAE (names, shapes, dtypes
    and bytes) plus the versions that shape an export. About 1 s per GB of weights."""
    h = hashlib.sha256()
    for part in (cones2.__version__, torch.__version__, f"opset-{onnx_export.DEFAULT_OPSET}", "fp32", "ort-fusions"):
        h.update(part.encode() + b"\0")
    components = engine.components
    for label, module in (("unet", components.unet), ("text_encoder", components.text_encoder),
                          ("vae", components.vae)):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{label}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_export_dir(engine) -> Path:
    """Where this engine's model's export lives in the cache (it may not exist yet)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", engine.components.model_id.split("@")[0])[:40] or "model"
    return cache_root() / CACHE_FOLDER / f"{stem}-{weights_fingerprint(engine)[:20]}"


def ensure_cached_export(engine, progress: bool | None = None) -> Path:
    """The cached export of `engine`'s model, made now (under a file lock) if no process made it yet.

    Needs a CPU fp32 engine: the export traces the loaded modules as they are. progress: a bar on
    stderr (default: when stderr is a terminal; the warning line is logged either way)."""
    from filelock import FileLock

    if engine.device.type != "cpu" or engine.dtype != torch.float32:
        raise Cones2Error(f"the cached ONNX export is made from a CPU fp32 engine, this one is "
                          f"{engine.device.type} {str(engine.dtype).removeprefix('torch.')}; export ahead of time "
                          "with `cones2-engine export onnx` and pass onnx_dir", "backend_options.onnx_dir")
    target = cached_export_dir(engine)
    if (target / MANIFEST).is_file():
        return target
    locks = target.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with _THREADS, FileLock(str(locks / f"{target.name}.lock")):
        if (target / MANIFEST).is_file():     # another process finished it while we waited
            return target
        onnx_export._require_onnx()
        log.warning("exporting %s to ONNX for the CPU runtime, once (cached in %s; `--backend sdpa` skips this)",
                    engine.components.model_id, target)
        onnx_export.export_engine(engine, target, progress=sys.stderr.isatty() if progress is None else progress,
                                  ort_fusions=True)
    return target
