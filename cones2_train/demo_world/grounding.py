"""Token grounding for the demo model: each object's kind word must attend to where the object is.

Layout guidance (SPEC 3) works by rectifying the cross-attention of the subject's word, so it can
only move an object if the model draws that object through its word's attention. During training
the UNet's cross-attention probabilities at its two finest levels (`Recipe.grounding_levels`: 8x8 and
4x4 for 8x8 latents, 16x16 and 8x8 for 16x16 ones) are recorded, and a token loss in
the spirit of TokenCompose (Wang et al., 2024) pulls the attention mass of every kind word into its
object's ground-truth box (token loss), and a pixel loss makes the box's cells attend to that word,
so the object's content flows through the word that guidance rectifies (not through the padding
tokens, which see the whole caption too). The processor is training-only; the shipped UNet is plain
diffusers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cones2.attention.backends import rectification_bias


class RecordingAttnProcessor:
    """diffusers attention processor: plain attention, and for cross-attention layers whose query
    count is in `levels` it keeps the head-averaged probabilities (B, N, 77) in `self.maps` while
    `self.recording` is True. Self-attention uses scaled_dot_product_attention. While
    `self.rectification` is (weights {N: (B, N, 77)}, coef (B,)), cross-attention is SPEC 3's
    rectified attention (the engine's `rectification_bias`; coef 0 = plain for that sample)."""

    def __init__(self, levels: tuple[int, ...] = (64, 16)):
        self.levels = set(levels)
        self.recording = False
        self.maps: list[torch.Tensor] = []
        self.rectification: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3 or attn.group_norm is not None \
                or attn.spatial_norm is not None or attn.norm_cross or attn.residual_connection:
            raise ValueError("RecordingAttnProcessor supports the UNet's transformer attention only")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))
        bias = None
        if is_cross and self.rectification is not None:
            weights, coef = self.rectification
            bias = rectification_bias(q, k, weights[n], coef, attn.scale)                # (B, 1, N, M)
        if is_cross and self.recording and n in self.levels:
            logits = (q @ k.transpose(-1, -2)) * attn.scale
            probs = torch.softmax(logits if bias is None else logits + bias, dim=-1)    # (B, H, N, M)
            self.maps.append(probs.mean(dim=1))
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


def box_coverage(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes (B, J, 4) normalised (x0, y0, x1, y1) -> (B, J, h*w): the share of each cell of an h x w
    grid (row-major, like the UNet's hidden states) that lies inside each box."""
    def overlap(lo, hi, cells):                       # lo, hi: (B, J) -> (B, J, cells)
        edges = torch.arange(cells + 1, dtype=boxes.dtype, device=boxes.device) / cells
        left, right = edges[:-1], edges[1:]
        return ((torch.minimum(hi[..., None], right) - torch.maximum(lo[..., None], left)).clamp(min=0) * cells)

    ox = overlap(boxes[..., 0], boxes[..., 2], w)     # (B, J, w)
    oy = overlap(boxes[..., 1], boxes[..., 3], h)     # (B, J, h)
    return (oy[..., :, None] * ox[..., None, :]).flatten(-2)


def grounding_loss(maps: list[torch.Tensor], positions: torch.Tensor, boxes: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss), each averaged over recorded layers and valid objects.

    maps: [(B, N, 77)] head-averaged attention probabilities; positions: (B, J) token position of
    each object's kind word; boxes: (B, J, 4) normalised; valid: (B, J) bool (objects that exist and
    whose caption was kept). Token loss: (1 - share of the word's attention mass inside its box)^2.
    Pixel loss: mean over the box's cells (weighted by coverage) of (1 - the cell's attention to the
    word)^2, so that an object's cells take its content from its word, which layout guidance steers.
    """
    zero = boxes.new_zeros(())
    if not maps or not bool(valid.any()):
        return zero, zero
    token, pixel = zero, zero
    weight = valid.to(boxes.dtype)
    for probs in maps:
        n = probs.shape[1]
        side = int(round(n ** 0.5))
        cover = box_coverage(boxes, side, side)                                         # (B, J, N)
        index = positions[:, None, :].expand(-1, n, -1)                                 # (B, N, J)
        word = probs.gather(2, index).transpose(1, 2)                                   # (B, J, N)
        inside = (word * cover).sum(-1) / word.sum(-1).clamp(min=1e-8)                 # (B, J)
        token = token + (((1 - inside) ** 2) * weight).sum() / weight.sum()
        per_cell = (cover * (1 - word) ** 2).sum(-1) / cover.sum(-1).clamp(min=1e-8)     # (B, J)
        pixel = pixel + (per_cell * weight).sum() / weight.sum()
    return token / len(maps), pixel / len(maps)
