"""The embedding-preservation regulariser of SPEC 1.3.

L_reg = a * ||E'(s)[0] - E0(s)[0]||_2 + b * ||E'(s)[1+k:] - E0(s)[1+k:]||_2, plain (not squared) L2
norms over all elements of each slice: the start token and everything after the subject's k tokens
(end token and padding) are held in place, the subject tokens 1..k are free.
"""
from __future__ import annotations

import torch


def embedding_preservation(tuned: torch.Tensor, frozen: torch.Tensor, k: int, a: float, b: float) -> torch.Tensor:
    """L_reg for one prompt `s`.

    tuned: E'(s), (77, D), part of the autograd graph. frozen: E0(s), (77, D), constant.
    k: number of tokens of the subject word. a / b: weights of the start-token / tail terms.
    Returns a 0-dim float32 tensor. The gradient of a norm at exactly 0 is 0 in PyTorch, so the first
    step (where E' == E0) is well defined.
    """
    diff = tuned.float() - frozen.float()
    first = torch.linalg.vector_norm(diff[0])
    rest = torch.linalg.vector_norm(diff[1 + k :])
    return a * first + b * rest
