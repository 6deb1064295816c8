"""Load a Stable Diffusion checkpoint (diffusers layout) with the diffusers/transformers classes.

Accepts a local directory or a Hugging Face hub id (downloaded through huggingface_hub when the
network allows). SD 2.x (D=1024, v-prediction) and SD 1.x (D=768, epsilon) both load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import Cones2Error

REQUIRED = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
            "scheduler/scheduler_config.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class Components:
    """The loaded parts of a checkpoint, plus where they came from."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    source: str
    model_id: str


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Cones2Error(f"not a device: {device!r} (use cpu, cuda or cuda:N)", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Cones2Error("CUDA was asked for but no CUDA device is available here", "device")
    return dev


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        value = dtype
    elif dtype in DTYPES:
        value = DTYPES[dtype]
    else:
        raise Cones2Error(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16", "dtype")
    if value == torch.float16 and device.type == "cpu":
        raise Cones2Error("fp16 needs a CUDA device; use fp32 or bf16 on the CPU", "dtype")
    return value


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local diffusers directory, downloading a hub id first if it is not a local path."""
    path = Path(path_or_id).expanduser()
    if not path.exists() and HUB_ID.fullmatch(str(path_or_id)):
        path = _download(str(path_or_id))
    if not path.is_dir():
        raise Cones2Error(f"model directory not found: {path_or_id}", "model")
    missing = [p for p in REQUIRED if not (path / p).exists()]
    if missing:
        raise Cones2Error(f"{path} is not a Stable Diffusion checkpoint in diffusers layout "
                          f"(missing {', '.join(missing)})", "model")
    return path


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all reach the user as one line
        raise Cones2Error(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                          "pass a local diffusers directory instead", "model") from None


def load_components(path_or_id: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                    config: str | os.PathLike | None = None) -> Components:
    """Load tokenizer, text encoder, UNet, VAE and scheduler config, in eval mode on `device`.
    A `.safetensors`/`.ckpt` file is a single-file checkpoint (`cones2.single_file`; `config`: a
    diffusers folder describing it, default the shipped SD 1.x/2.x configs)."""
    from .single_file import is_single_file, load_single_file

    if is_single_file(path_or_id):
        return _ready(load_single_file(path_or_id, dtype, config), device)
    return _ready(_load_folder(path_or_id, dtype), device)


def _ready(components: Components, device: torch.device) -> Components:
    """Check that the parts fit together; put them in eval mode on `device`, frozen."""
    unet, text_encoder = components.unet, components.text_encoder
    prediction = components.scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise Cones2Error(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction)", "model")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise Cones2Error(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder width "
                          f"{text_encoder.config.hidden_size}", "model")
    for module in (text_encoder, unet, components.vae):
        module.to(device).eval().requires_grad_(False)
    return components


def _load_folder(path_or_id: str | os.PathLike, dtype: torch.dtype) -> Components:
    """The parts of a diffusers-layout folder (or hub id), on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_checkpoint(path_or_id)
    quiet_library_logging()
    scheduler_config = json.loads((root / "scheduler/scheduler_config.json").read_text())

    def load(what, fn):
        try:
            return fn()
        except Exception as exc:  # corrupt or incompatible weights: say which part failed
            raise Cones2Error(f"cannot load the {what} from {root}: {type(exc).__name__}: {exc}", "model") from None

    tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
    text_encoder = load("text encoder", lambda: CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype))
    unet = load("UNet", lambda: UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype))
    vae = load("VAE", lambda: AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype))
    return Components(tokenizer, text_encoder, unet, vae, scheduler_config, str(root), model_id(root))


def quiet_library_logging() -> None:
    """The libraries' weight-loading bars and notices go to stderr, which is reserved for our one-line
    errors; the engine reports its own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def model_id(root: Path) -> str:
    """A short, stable id of a checkpoint: its folder name plus a hash of its component configs."""
    h = hashlib.sha256()
    for part in REQUIRED:
        p = root / part
        if p.is_file():
            h.update(p.read_bytes())
    return f"{root.name}@{h.hexdigest()[:12]}"


FINGERPRINT_VERSION = "signs1"
TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


@torch.no_grad()
def model_fingerprint(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> str:
    """What a residual was trained on, identified from the weights: sha256 over the names, shapes and
    sign bits of the text encoder's token and position embeddings, its last layer and final norm, and
    every UNet cross-attention key/value projection (the weights that read text).

    Sign bits survive fp32 -> fp16/bf16 casts exactly, so the same checkpoint loaded in any dtype
    gives the same fingerprint; a fine-tune moves some weights across zero and gets another one.
    (D alone cannot tell SD 1.5 from its fine-tunes: they all have D = 768.)"""
    text_state = text_encoder.state_dict()
    layer_of = {k: int(m.group(1)) for k in text_state if (m := TEXT_LAYER.search(k))}
    last = max(layer_of.values(), default=None)

    def wanted(name: str) -> bool:
        return (("embeddings" in name and name.endswith(".weight")) or layer_of.get(name) == last
                or "final_layer_norm" in name)

    parts = [(f"text.{k}", v) for k, v in sorted(text_state.items()) if wanted(k) and v.is_floating_point()]
    parts += [(f"unet.{k}", v) for k, v in sorted(unet.state_dict().items())
              if ".attn2.to_k." in k or ".attn2.to_v." in k]
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name, tensor in parts:
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(np.packbits(torch.signbit(tensor).cpu().numpy()).tobytes())
    return h.hexdigest()[:16]
