"""Per-sample standard deviation of the attention logits without materialising them.

sd_b = unbiased std of S_b = q_b k_b^T over (heads, queries, keys) (SPEC 3). Closed form from
second moments: sum S = sum_h (sum_n q_hn) . (sum_m k_hm) and sum S^2 = sum_h <q_h^T q_h, k_h^T k_h>_F,
so the cost is two (d x d) Gram matrices per head instead of an (N x M) score matrix.
The final combination is done in float64 to keep the cancellation in E[S^2] - E[S]^2 harmless.
"""
from __future__ import annotations

import torch


def logit_std(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q: (B, H, N, d), k: (B, H, M, d) -> (B,) float32 unbiased std of q k^T per sample."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    qf, kf = q.float(), k.float()
    total = (qf.sum(dim=2) * kf.sum(dim=2)).sum(dim=(1, 2))                 # (B,)
    gram_q = qf.transpose(-1, -2) @ qf                                         # (B, H, d, d)
    gram_k = kf.transpose(-1, -2) @ kf
    total_sq = (gram_q * gram_k).sum(dim=(1, 2, 3))                            # (B,)
    count = H * N * M
    t, t2 = total.double(), total_sq.double()
    var = (t2 - t * t / count) / (count - 1)
    return var.clamp_min(0).sqrt().float()
