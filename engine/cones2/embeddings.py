"""Prompt -> conditional / unconditional text embeddings, residuals composed in (SPEC section 2).

C = E(P), then C[pos_j] += R_j for each subject; U = E("") is never modified.
"""
from __future__ import annotations

import torch

from .errors import Cones2Error
from .residual import Residual
from .tokens import SEQ_LEN, SubjectTokens, prompt_token_ids


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], encode_ids=None,
                   token_ids: list | None = None) -> torch.Tensor:
    """E(p) for each prompt: final hidden states after the final layer norm, (B, 77, D).

    encode_ids: optional replacement for the PyTorch text encoder, ids (B, 77) -> (B, 77, D)
    (a compiled runner's exported text encoder). token_ids: per prompt, its `prompt_token_ids` when
    already known (None: tokenize it here), so a checked prompt is not tokenized twice.
    """
    known = token_ids or [None] * len(prompts)
    ids = torch.tensor([list(k) if k else prompt_token_ids(tokenizer, p) for p, k in zip(prompts, known)],
                       device=text_encoder.device)
    return encode_ids(ids) if encode_ids is not None else text_encoder(ids)[0]


def add_residuals(cond: torch.Tensor, placements: list[tuple[SubjectTokens, Residual]]) -> torch.Tensor:
    """Return a copy of `cond` (77, D) with each residual added at its subject's positions.

    A residual with fewer rows than its word has tokens lands on the first position(s) only.
    """
    out = cond.clone()
    for tokens, residual in placements:
        rows = residual.embedding.to(out.device, out.dtype)
        k = rows.shape[0]
        for start in tokens.residual_starts:
            if start + k > SEQ_LEN - 1:
                raise Cones2Error(f"residual rows at {start}..{start + k - 1} run past the prompt",
                                  f"subjects.{tokens.name}")
            out[start : start + k] += rows
    return out
