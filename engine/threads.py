"""CPU thread count for torch, set once at a command's start (`--threads` on every command).

The default is chosen by measurement (see docs); `configure_threads(None)` applies it.
"""
from __future__ import annotations

import torch

from .errors import Cones2Error


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: the measured default) and return the count in use."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise Cones2Error(f"must be a positive integer, got {threads!r}", "threads")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
