"""Single-file Stable Diffusion checkpoints (`.safetensors`, or `.ckpt` read with weights_only) in the
original LDM key layout, loaded with diffusers' single-file conversion, fully offline.

The diffusers configs come from the package (`single_file_configs`, SD 1.x or 2.x, told apart by the
text encoder's keys), written once into the cache with CLIP's tokenizer; `config=DIR` names another
diffusers folder whose configs describe the checkpoint (a model that is neither SD 1.x nor 2.x).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import Cones2Error

SUFFIXES = (".safetensors", ".ckpt")
TEXT_ENCODER_KEYS = {"sd1": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                     "sd2": "cond_stage_model.model.token_embedding.weight"}
CONFIG_VERSION = "v1"
DIGEST_BYTES = 1 << 20


def is_single_file(path) -> bool:
    """Whether `path` names a single-file checkpoint (rather than a diffusers folder or a hub id)."""
    p = Path(str(path)).expanduser()
    return p.suffix.lower() in SUFFIXES and p.is_file()


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (a `state_dict` wrapper is unwrapped); `.ckpt` through
    `torch.load(weights_only=True)` only, which never runs code. Float tensors must be finite."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files and refused pickles of many kinds: one line
        raise Cones2Error(f"cannot read {path.name} as a checkpoint ({type(exc).__name__}; .ckpt files are read "
                          "with weights_only=True, which never runs code)", "model") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise Cones2Error(f"{path.name} holds no state dict", "model")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Cones2Error(f"{path.name}: tensor {key} holds NaN or infinite values", "model")
    return tensors


def family(state: dict) -> str:
    """"sd1" or "sd2", from the text encoder's keys."""
    for name, key in TEXT_ENCODER_KEYS.items():
        if key in state:
            return name
    raise Cones2Error("not a Stable Diffusion 1.x/2.x checkpoint in the original layout (no "
                      f"{' or '.join(TEXT_ENCODER_KEYS.values())}); pass a diffusers folder instead", "model")


def config_dir(name: str) -> Path:
    """The diffusers configs (and tokenizer) of family `name`, written into the cache on first use."""
    from .atomic import atomic_directory
    from .default_model import cache_root
    from .single_file_configs import CONFIGS
    from .tokenizer_data import build_clip_tokenizer

    target = cache_root() / "single-file-configs" / f"{name}-{CONFIG_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    spec = CONFIGS[name]
    with atomic_directory(target, keep_existing=True) as tmp:
        for part, file in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                           ("scheduler", "scheduler_config.json")):
            (tmp / part).mkdir()
            (tmp / part / file).write_text(json.dumps(spec[part], indent=2))
        build_clip_tokenizer(pad_token=spec["pad_token"]).save_pretrained(tmp / "tokenizer")
        (tmp / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "_cones2_single_file": name}))
    return target


def load_single_file(path: str | os.PathLike, dtype: torch.dtype, config: str | os.PathLike | None = None):
    """Components of a single-file checkpoint (on the CPU; the caller moves them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    from .loading import Components, quiet_library_logging

    path = Path(path).expanduser()
    state = read_checkpoint(path)
    root = Path(config) if config is not None else config_dir(family(state))
    quiet_library_logging()
    common = dict(config=str(root), torch_dtype=dtype, local_files_only=True)

    def load(what, fn):
        try:
            return fn()
        except Cones2Error:
            raise
        except Exception as exc:  # a checkpoint whose shapes do not fit the configs: say which part
            raise Cones2Error(f"cannot load the {what} from {path.name}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}", "model") from None

    unet = load("UNet", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common))
    vae = load("VAE", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common))
    text_encoder = load("text encoder", lambda: create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, subfolder="text_encoder", **common))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return Components(tokenizer, text_encoder, unet, vae, scheduler_config, str(path), f"{path.name}@{_digest(path)}")


def _digest(path: Path) -> str:
    """A short id of the file: sha256 of its size and first MiB (hashing gigabytes would take seconds)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(DIGEST_BYTES))
    return h.hexdigest()[:12]
