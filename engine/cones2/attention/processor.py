"""The diffusers attention processor that routes every attention layer to a backend.

Self-attention and unguided calls use `backend.plain`; cross-attention with a rectification uses
`backend.cross` with the weight map of this layer's resolution (looked up by its query count N).
"""
from __future__ import annotations

import torch

from ..backends import BASE_ATTENTION
from ..backends import attention_backend as get_backend
from .context import AttentionContext


class Cones2AttnProcessor:
    """Drop-in for diffusers' AttnProcessor2_0 that reads an `attention_context` kwarg; a call
    without one (a diffusers pipeline sharing the UNet) runs the registry's `BASE_ATTENTION`."""

    def __init__(self, default_backend: str = BASE_ATTENTION):
        self.default_backend = default_backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attention_context: AttentionContext | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("cones2 attention does not take an attention_mask")
        backend = attention_context.backend if attention_context is not None else get_backend(self.default_backend)
        rect = attention_context.rectification if attention_context is not None else None

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)

        batch, n_query, _ = query.shape
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross and rect is not None:
            out = backend.cross(query, key, value, rect.weights[n_query], rect.coef, attn.scale)
        else:
            out = backend.plain(query, key, value, attn.scale)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
