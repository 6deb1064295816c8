"""Training the demo UNet under layout guidance (issue 14): some samples of a batch are denoised with
SPEC 3's rectified cross-attention, built from their own ground-truth boxes.

Layout guidance moves an object by masking its word's attention outside a box during the first
sampling steps. A model that never saw rectified attention in training can answer it by drawing the
object smaller or not at all (bench/results/quality.md section 8). Training some samples under the
rectification the sampler will apply, with the real image as the target, teaches the UNet to draw
whole objects from rectified maps. The rectification is the engine's own (its weight maps and
attention bias), at the demo's sampling settings: 30 Euler steps, the first 15 guided, w+ 2.5, g 0.08.
"""
from __future__ import annotations

import numpy as np
import torch

from cones2.config import SamplingConfig
from cones2.layout import DEFAULT_STRENGTH, Layout
from cones2.schedule import guidance_log_terms

SAMPLING_STEPS = 30            # the demo's sampling: `make demo` and bench/quality.py
GUIDED_STEPS = 15              # G: its guided (and self-recurrent) steps
MAX_MARGIN = 8                 # each box is the object's own, grown by 0..8 px (the evaluation grows it by 4)


def guided_coefficients(num_train_timesteps: int = 1000) -> torch.Tensor:
    """(T,) float32: for each training timestep, g * log(1 + sigma_i^2) of the guided sampling step i
    nearest to it (SPEC 3), or 0 where the nearest step is unguided."""
    steps = np.linspace(num_train_timesteps - 1, 0, SAMPLING_STEPS)          # SPEC 4's "linspace" spacing
    nearest = np.abs(np.arange(num_train_timesteps)[:, None] - steps[None, :]).argmin(axis=1)
    logs = guidance_log_terms(GUIDED_STEPS)
    coef = [SamplingConfig.guidance_weight * logs[i] if i < GUIDED_STEPS else 0.0 for i in nearest]
    return torch.tensor(coef, dtype=torch.float32)


def rectification_maps(positions: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor,
                       margins: torch.Tensor, image_size: int, shapes: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """SPEC 3 weight maps W (B, h*w, 77) per level for a training batch, built by `Layout.weight_maps`.

    positions (B, J) kind-word token positions; boxes (B, J, 4) normalised; valid (B, J) objects that
    exist in a kept caption; chosen (B,) samples to rectify (the others get all-zero maps);
    margins (B, J) pixels each box grows by (clipped to the image).
    """
    maps = {h * w: torch.zeros(len(chosen), h * w, 77) for h, w in shapes}
    grow = margins.to(torch.float32) / image_size
    for b in torch.nonzero(chosen).flatten().tolist():
        regions, words = {}, {}
        for j in torch.nonzero(valid[b]).flatten().tolist():
            x0, y0, x1, y1 = boxes[b, j].tolist()
            g = float(grow[b, j])
            name = f"object{j}"
            regions[name] = (max(0.0, x0 - g), max(0.0, y0 - g), min(1.0, x1 + g), min(1.0, y1 + g))
            words[name] = [int(positions[b, j])]
        if not regions:
            continue
        layout = Layout.from_boxes(regions, strengths=DEFAULT_STRENGTH)
        for n, w in layout.weight_maps(words, image_size, image_size, shapes, SamplingConfig.negative_weight).items():
            maps[n][b] = w
    return maps


__all__ = ["SAMPLING_STEPS", "GUIDED_STEPS", "MAX_MARGIN", "guided_coefficients", "rectification_maps"]
