"""`TrainConfig`: every setting of one residual training run, validated once (SPEC 1.4 defaults).

Frozen, checked in `__post_init__`; each error names the offending field. Inner code trusts it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cones2 import Cones2Error

DTYPE_NAMES = ("fp32", "fp16", "bf16")
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    steps: optimizer steps (reference recipe: 4000). lr: AdamW learning rate, constant (5e-6).
    batch_size: images per step (1). resolution: square training size in pixels; None = the model's
    own (768 for SD 2.1, the reference recipe); must suit the VAE and UNet (a multiple of 64 on SD).
    reg_first / reg_rest: weights a / b of the SPEC 1.3 regulariser (1e-2 / 1e-3).
    grad_clip: max global grad norm (1.0). weight_decay: AdamW's decoupled weight decay (1e-2).
    seed: seeds every random draw (image order, latent samples, noise, timesteps).
    device: "cpu", "cuda", "cuda:N" or None (CUDA when available, else CPU).
    dtype: autocast precision "fp32", "bf16" or "fp16"; None = bf16 on CUDA (fp16 where bf16 is
    unsupported), fp32 on CPU. The text-encoder copy and its optimizer state are always fp32.
    templates: caption template file for the residual (SPEC 1.5); None = the shipped list.
    train_prompt: the caption the denoising loss conditions on, with one {} for the word. "{}" (the
    default) is SPEC 1.2: the bare word. Anything else (e.g. "a {}") departs from SPEC, on purpose:
    a model that never saw its words without context (the demo model) learns more from the word in
    a context it knows. The regulariser then holds the start token and everything after the word,
    leaving the context before it free like the word (docs/training.md).
    save_every: write a resumable checkpoint every N steps (0 = only on interrupt).
    checkpoint_dir: where checkpoints go (None = no checkpoints, not even on interrupt).
    keep_checkpoints: how many periodic checkpoints to keep (oldest are deleted).
    resume: a checkpoint (a `step-NNNNNN` folder, or a checkpoint_dir: its latest) to continue from.
    gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~30% slower).
    """

    steps: int = 4000
    lr: float = 5e-6
    batch_size: int = 1
    resolution: int | None = None
    reg_first: float = 1e-2
    reg_rest: float = 1e-3
    grad_clip: float = 1.0
    weight_decay: float = 1e-2
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    templates: str | None = None
    train_prompt: str = "{}"
    save_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 1
    resume: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _int(self, "steps", 1)
        _int(self, "batch_size", 1, 64)
        _int(self, "seed", 0, 2**63 - 1)
        _int(self, "save_every", 0)
        _int(self, "keep_checkpoints", 1)
        if self.resolution is not None:
            _int(self, "resolution", 8, MAX_RESOLUTION)
        _float(self, "lr", positive=True)
        _float(self, "grad_clip", positive=True)
        for name in ("reg_first", "reg_rest", "weight_decay"):
            _float(self, name, positive=False)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise Cones2Error(f"must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}", "dtype")
        for name in ("device", "templates", "checkpoint_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise Cones2Error(f"must be a non-empty string or None, got {value!r}", name)
        if not isinstance(self.train_prompt, str) or self.train_prompt.count("{}") != 1:
            raise Cones2Error(f"must be a caption with exactly one {{}} for the word, got {self.train_prompt!r}",
                              "train_prompt")
        if self.save_every and self.checkpoint_dir is None:
            raise Cones2Error("needs checkpoint_dir (where to write the checkpoints)", "save_every")

    def to_dict(self) -> dict:
        return asdict(self)


def _int(cfg, name: str, low: int, high: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Cones2Error(f"must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise Cones2Error(f"must be {bound}, got {value}", name)


def _float(cfg, name: str, positive: bool) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Cones2Error(f"must be a finite number, got {value!r}", name)
    if positive and value <= 0:
        raise Cones2Error(f"must be > 0, got {value}", name)
    if not positive and value < 0:
        raise Cones2Error(f"must be >= 0, got {value}", name)
    object.__setattr__(cfg, name, float(value))
