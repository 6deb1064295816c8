"""Resumable state of one demo-model training stage: safetensors for tensors, JSON for the rest.

A checkpoint folder holds the trainable weights, the EMA weights (unet stage), the optimizer state,
the data/noise generator state and `state.json` (stage, step, recipe fingerprint, elapsed seconds,
loss log). It is written to a temporary folder and renamed, so an interrupted save never leaves a
broken checkpoint; only the newest one is kept.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from cones2 import Cones2Error
from cones2.atomic import atomic_directory
from safetensors.torch import load_file, save_file

from cones2_train.checkpoint import join_optimizer_state, split_optimizer_state

FORMAT = "cones2-demo-world-state/1"


def save_state(folder: str | os.PathLike, *, stage: str, step: int, fingerprint: str, weights: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, generator: torch.Generator, ema: dict[str, torch.Tensor] | None = None,
               info: dict | None = None) -> Path:
    """Write `folder` atomically (replacing any previous checkpoint there)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(folder) as tmp:
        save_file(_contiguous(weights), tmp / "weights.safetensors")
        if ema is not None:
            save_file(_contiguous(ema), tmp / "ema.safetensors")
        opt_tensors, opt_doc = split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
        doc = {"format": FORMAT, "stage": stage, "step": step, "fingerprint": fingerprint, "optimizer": opt_doc,
               "info": info or {}}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1))
    return folder


def load_state(folder: str | os.PathLike, stage: str, fingerprint: str) -> dict:
    """Read a checkpoint; its stage and recipe fingerprint must match. Returns a dict with step,
    weights, ema (or None), optimizer (a state_dict), generator (a state tensor) and info."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Cones2Error(f"cannot read checkpoint {folder}: {exc}", "resume") from None
    if doc.get("format") != FORMAT or doc.get("stage") != stage:
        raise Cones2Error(f"{folder} is not a {stage}-stage checkpoint of this recipe", "resume")
    if doc["fingerprint"] != fingerprint:
        raise Cones2Error(f"{folder} was made with other recipe settings (fingerprint {doc['fingerprint']}, "
                          f"now {fingerprint}); start a new --out", "resume")
    ema_path = folder / "ema.safetensors"
    return {
        "step": int(doc["step"]), "info": doc.get("info", {}),
        "weights": load_file(folder / "weights.safetensors"),
        "ema": load_file(ema_path) if ema_path.is_file() else None,
        "optimizer": join_optimizer_state(load_file(folder / "optimizer.safetensors"), doc["optimizer"]),
        "generator": load_file(folder / "rng.safetensors")["generator"],
    }


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
