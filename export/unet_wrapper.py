"""The UNet as an exportable module whose layout rectification is a set of real graph inputs.

`UNetExportWrapper(sample, timestep, encoder_hidden_states, coef, *weights)` calls the diffusers
UNet with an `AttentionContext(onnx backend, Rectification(weights, coef))`, so the per-sample
logit std, the rectification and the hard mask (SPEC 3) are inside the exported graph and the
weight maps stay dynamic inputs, one per attention level (`Layout.weight_maps` gives exactly
these). Inside a trace a layer's query count N is symbolic and cannot key a dict, so each
attention layer is told its level index once (`routed_by_level`) and picks its map by that.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from cones2.attention import AttentionContext, Cones2AttnProcessor, Rectification, get_backend

from . import graph_attention


class LevelWeights(tuple):
    """Weight maps indexed by attention level (0 = full latent resolution): each (B, N_level, 77)."""


class _SameMap(Mapping):
    """A mapping that answers every key with one map: the layer already chose it by level."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __getitem__(self, key):
        return self.weight

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 1


class LevelRoutedProcessor(Cones2AttnProcessor):
    """Cones2AttnProcessor for a layer at a known level; reads `LevelWeights[level]` when given them
    and otherwise behaves exactly like its parent (N-keyed weights)."""

    def __init__(self, level: int, default_backend: str = "sdpa"):
        super().__init__(default_backend)
        self.level = level

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 attention_context: AttentionContext | None = None):
        rect = attention_context.rectification if attention_context is not None else None
        if rect is not None and isinstance(rect.weights, LevelWeights):
            weights = _SameMap(rect.weights[self.level]) if encoder_hidden_states is not None else {}
            attention_context = AttentionContext(attention_context.backend, Rectification(weights, rect.coef))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attention_context)


def processor_levels(unet) -> dict[str, int]:
    """Processor name -> attention level, from diffusers' UNet2DConditionModel block naming:
    down_blocks.i is at level i, the mid block at the lowest level, up_blocks.j at level L-1-j."""
    last = len(unet.config.block_out_channels) - 1
    levels = {}
    for name in unet.attn_processors:
        block, _, rest = name.partition(".")
        if block == "down_blocks":
            levels[name] = int(rest.split(".")[0])
        elif block == "up_blocks":
            levels[name] = last - int(rest.split(".")[0])
        elif block == "mid_block":
            levels[name] = last
        else:
            raise ValueError(f"attention layer {name!r} is outside the down/mid/up blocks this exporter knows")
    return levels


def cross_attention_levels(unet) -> list[int]:
    """The levels that hold attention layers, i.e. the weight inputs the exported graph takes."""
    return sorted(set(processor_levels(unet).values()))


@contextlib.contextmanager
def routed_by_level(unet):
    """Install LevelRoutedProcessors for the duration of an export or eager check, then restore."""
    saved = unet.attn_processors
    levels = processor_levels(unet)
    unet.set_attn_processor({name: LevelRoutedProcessor(level) for name, level in levels.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


class UNetExportWrapper(torch.nn.Module):
    """The exported UNet signature.

    sample (B, C, h, w) model dtype; timestep (B,) float32; encoder_hidden_states (B, 77, D) model
    dtype; coef (B,) float32, g * log(1 + sigma^2) per sample, 0 = unguided; weights: one
    (B, N_l, 77) float32 map per level in `levels` (N_l = h_l * w_l, row-major). Returns the UNet
    prediction (B, C, h, w). Use inside `routed_by_level(unet)`.
    """

    fixed_inputs = 4  # sample, timestep, encoder_hidden_states, coef; then one weight per level

    def __init__(self, unet, levels: list[int], backend: str = graph_attention.NAME):
        super().__init__()
        self.unet = unet
        self.levels = list(levels)
        self.backend = get_backend(backend)

    def forward(self, sample, timestep, encoder_hidden_states, coef, *weights):
        by_level = [None] * (max(self.levels) + 1)
        for level, weight in zip(self.levels, weights):
            by_level[level] = weight
        context = AttentionContext(self.backend, Rectification(LevelWeights(by_level), coef))
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


class TextEncoderWrapper(torch.nn.Module):
    """input_ids (B, 77) int64 -> last_hidden_state (B, 77, D): E(p) of SPEC 2."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    """latent (B, 4, h, w), the sampler's final latents -> images (B, 3, 8h, 8w) in [-1, 1]
    (the division by the VAE scaling factor is inside, SPEC 4)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]
