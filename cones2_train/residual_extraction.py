"""The residual of a tuned text encoder (SPEC 1.5).

R = mean over the captions t of (E'(t)[pos] - E0(t)[pos]), pos = the k positions of the word's tokens
in t; shape (k, D). Computed in float32 without autocast: it is what the engine adds at inference.
"""
from __future__ import annotations

import torch

from .templates import Caption

CHUNK = 32


@torch.no_grad()
def extract_residual(tuned, frozen, captions: list[Caption], k: int) -> torch.Tensor:
    """tuned / frozen: CLIP text encoders (E', E0) on one device; captions from `captions_for`.

    Returns (k, D) float32 on the CPU.
    """
    device = next(tuned.parameters()).device
    total = None
    for i in range(0, len(captions), CHUNK):
        chunk = captions[i : i + CHUNK]
        ids = torch.tensor([c.token_ids for c in chunk], device=device)
        diff = _hidden(tuned, ids) - _hidden(frozen, ids)                      # (b, 77, D)
        rows = torch.stack([diff[j, c.start : c.start + k] for j, c in enumerate(chunk)])  # (b, k, D)
        part = rows.sum(0)
        total = part if total is None else total + part
    return (total / len(captions)).cpu()


def _hidden(encoder, ids: torch.Tensor) -> torch.Tensor:
    """E(ids) in float32: the final hidden states after the final layer norm, (b, 77, D)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.autocast(ids.device.type, enabled=False):
            return encoder(ids)[0].float()
    finally:
        encoder.train(was_training)
