"""What one UNet call tells its attention layers: which backend runs, and the layout rectification.

Passed through diffusers' `cross_attention_kwargs` as `attention_context`, so the UNet holds no
per-request state and one model can serve any request (or a batch of requests) at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rectification:
    """SPEC 3 inputs for one batched UNet call.

    weights: query pixels N -> W (B, N, M) float32, one map per attention resolution.
    coef: (B,) float32, g * log(1 + sigma_i^2) per sample; 0 = plain attention for that sample
    (the unconditional half of a CFG batch).
    """

    weights: dict[int, torch.Tensor]
    coef: torch.Tensor


@dataclass(frozen=True)
class AttentionContext:
    backend: object  # an AttentionBackend
    rectification: Rectification | None = None
