"""CPU thread count for torch, set once at a command's start (`--threads` on every command).

The default is measured (bench/threads.py, numbers in bench/results/threads.md): on a 2-core machine
under load, torch's default (one thread per core) made a 30-step generation many times slower than
one thread, because each parallel region waits for a thread the other processes keep off its core.
So: one thread on machines of at most 2 usable cores; torch's own choice elsewhere (the idle
many-core case was not measured); OMP_NUM_THREADS, when set, is always respected.
"""
from __future__ import annotations

import os

from .errors import Cones2Error, quote

SMALL_MACHINE_CORES = 2   # at most this many usable cores: one thread (bench/results/threads.md)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count `configure_threads(None)` applies (see the module docstring)."""
    import torch  # here, not at the top: commands check their flags before paying for torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()          # torch read it at start-up
    return 1 if usable_cores() <= SMALL_MACHINE_CORES else torch.get_num_threads()


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: `default_threads()`) and return the count in use."""
    import torch

    if threads is None:
        threads = default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise Cones2Error(f"must be an integer in [1, 1024], got {quote(threads)}", "threads")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
