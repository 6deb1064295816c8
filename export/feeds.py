"""The UNet graph's inputs from what the sampler hands a runner, shared by the ONNX Runtime and
TensorRT runners.

The sampler passes `Rectification(weights keyed by query count N, coef)` or None; the graph takes
coef (B,) and one weight map per attention level. An unguided call becomes coef = 0 and zero maps
(cached per shape), which the graph turns into plain attention exactly (SPEC 3).
"""
from __future__ import annotations

import torch

from cones2.attention import Rectification

from .contracts import UNetContract
from .manifest import check_size


class UNetFeeds:
    """`feeds(sample, timestep, embeddings, rectification) -> {input name: tensor}`.

    sample (B, C, h, w); timestep 0-dim or (B,); embeddings (B, 77, D). Tensors stay on their device.
    """

    def __init__(self, contract: UNetContract, manifest: dict):
        self.contract, self.manifest = contract, manifest
        self._zeros: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> dict[str, torch.Tensor]:
        f = self.contract.facts
        batch, _, h, w = sample.shape
        height, width = h * f.vae_scale, w * f.vae_scale
        check_size(self.manifest, height, width, "height")
        names = self.contract.weight_names()
        shapes = self.contract.shapes(batch, height, width)
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)
        if rectification is None:
            coef = torch.zeros(batch, device=sample.device)
            key = (batch, height, width, sample.device)
            if key not in self._zeros:
                self._zeros[key] = [torch.zeros(shapes[n], device=sample.device) for n in names]
            weights = self._zeros[key]
        else:
            coef = rectification.coef
            weights = [rectification.weights[shapes[n][1]] for n in names]   # keyed by N = h_l * w_l
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings, "coef": coef}
        feeds.update(zip(names, weights))
        return feeds
