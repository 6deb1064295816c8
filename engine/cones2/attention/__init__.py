"""Attention seam: backends (reference, sdpa, triton, cuda, ...), the per-call context, the processor.

Importing this package registers the built-in attention backends in `cones2.backends`.
"""
from ..backends import attention_backend as get_backend
from . import cuda_backend, triton_backend, xformers_backend  # noqa: F401  (register themselves; import nothing heavy)
from cones2.kernels.reference import HARD_MASK

from .backends import rectification_bias
from .context import AttentionContext, Rectification
from .processor import Cones2AttnProcessor
from .stats import logit_std

__all__ = ["HARD_MASK", "AttentionContext", "Cones2AttnProcessor", "Rectification", "get_backend", "logit_std",
           "rectification_bias"]
