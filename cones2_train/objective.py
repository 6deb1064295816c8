"""The denoising objective of SPEC 1.2, in DDPM terms, from the checkpoint's scheduler config.

noisy = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * noise, t uniform over the training timesteps;
target = noise (epsilon models) or v = sqrt(ac_t) * noise - sqrt(1 - ac_t) * x0 (v-prediction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cones2 import Cones2Error

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DenoisingObjective:
    """alphas_cumprod: (T,) float32 on the training device; prediction_type: epsilon or v_prediction."""

    alphas_cumprod: torch.Tensor
    prediction_type: str

    @classmethod
    def from_scheduler_config(cls, config: dict, device: torch.device) -> "DenoisingObjective":
        """Betas exactly as diffusers' DDPM scheduler builds them (linear, scaled_linear, cosine, trained)."""
        from diffusers import DDPMScheduler

        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise Cones2Error(f"prediction_type {prediction!r} cannot be trained (epsilon or v_prediction)", "model")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        try:
            scheduler = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise Cones2Error(f"unsupported noise schedule in scheduler_config.json: {exc}", "model") from None
        return cls(scheduler.alphas_cumprod.to(device, torch.float32), prediction)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0, noise: (B, C, h, w) float32; t: (B,) int64 -> (noisy input, regression target)."""
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        signal, sigma = ac.sqrt(), (1.0 - ac).sqrt()
        noisy = signal * x0 + sigma * noise
        target = noise if self.prediction_type == "epsilon" else signal * noise - sigma * x0
        return noisy, target
