"""Resumable training checkpoints: tensors in safetensors, everything else in JSON (no pickle).

A checkpoint is a folder `step-NNNNNN/` holding the tuned text encoder, the AdamW state, the RNG
states, the cached image latents and `state.json` (step, settings, optimizer hyper-parameters,
grad-scaler state). It is written to a temporary folder and renamed, so a crash or a second Ctrl-C
never leaves a half checkpoint; resuming from it continues bit for bit where the run stopped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from cones2 import Cones2Error
from cones2.atomic import atomic_directory
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "cones2-train-checkpoint/1"
STEP_DIR = re.compile(r"step-(\d{6,})")


@dataclass
class CheckpointState:
    """What a checkpoint holds, as plain tensors and JSON-able values."""

    step: int
    info: dict                               # settings the run must match to resume (JSON-able)
    text_encoder: dict[str, torch.Tensor]    # E' state dict
    optimizer: dict                          # torch optimizer state_dict (tensors inside "state")
    rng: dict[str, torch.Tensor]             # generator / torch RNG states (uint8 tensors)
    latents: dict[str, torch.Tensor]         # LatentCache mean / std
    scaler: dict | None = None               # GradScaler state_dict (fp16 only)


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_checkpoint(root: str | os.PathLike, state: CheckpointState, keep: int | None = None) -> Path:
    """Write `root/step-NNNNNN` atomically; then keep only the newest `keep` step folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = step_dir(root, state.step)
    with atomic_directory(target) as tmp:
        opt_tensors, opt_json = split_optimizer_state(state.optimizer)
        encoder = {k: v.detach().cpu().contiguous() for k, v in state.text_encoder.items()}
        save_file(encoder, tmp / "text_encoder.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in state.rng.items()}, tmp / "rng.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in state.latents.items()}, tmp / "latents.safetensors")
        doc = {"format": FORMAT, "step": state.step, "info": state.info, "optimizer": opt_json, "scaler": state.scaler}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    if keep is not None:
        for old in sorted(_step_dirs(root))[:-keep]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(path: str | os.PathLike, field: str = "resume") -> Path:
    """A step folder, or a checkpoint folder (its newest step folder)."""
    p = Path(path).expanduser()
    if (p / "state.json").is_file():
        return p
    if p.is_dir():
        steps = sorted(_step_dirs(p))
        if steps:
            return steps[-1]
        raise Cones2Error(f"{p} holds no checkpoint (no state.json, no step-NNNNNN folders)", field)
    raise Cones2Error(f"checkpoint not found: {p}", field)


def load_checkpoint(path: str | os.PathLike, field: str = "resume") -> CheckpointState:
    """Read a checkpoint folder written by `save_checkpoint` (CPU tensors)."""
    p = resolve_checkpoint(path, field)
    try:
        doc = json.loads((p / "state.json").read_text())
        if doc.get("format") != FORMAT:
            raise Cones2Error(f"{p} is not a {FORMAT} checkpoint (format {doc.get('format')!r})", field)
        te = load_file(p / "text_encoder.safetensors")
        opt_tensors = load_file(p / "optimizer.safetensors")
        rng = load_file(p / "rng.safetensors")
        latents = load_file(p / "latents.safetensors")
    except (OSError, SafetensorError, json.JSONDecodeError, AttributeError) as exc:
        raise Cones2Error(f"cannot read checkpoint {p}: {type(exc).__name__}: {exc}", field) from None
    optimizer = join_optimizer_state(opt_tensors, doc["optimizer"])
    return CheckpointState(int(doc["step"]), doc["info"], te, optimizer, rng, latents, doc.get("scaler"))


def _step_dirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir() and STEP_DIR.fullmatch(d.name) and (d / "state.json").is_file()]


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> ({"<param>.<key>": tensor}, JSON part)."""
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(doc.get("scalars", {}).items()):
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}
