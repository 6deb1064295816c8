"""Attention seam: backends (reference, sdpa, triton, ...), the per-call context, the processor."""
from .backends import HARD_MASK, attention_backend_names, get_backend, register_backend, rectification_bias
from .context import AttentionContext, Rectification
from .processor import Cones2AttnProcessor
from .stats import logit_std

__all__ = [
    "HARD_MASK", "AttentionContext", "Cones2AttnProcessor", "Rectification", "attention_backend_names",
    "get_backend", "logit_std", "rectification_bias", "register_backend",
]
