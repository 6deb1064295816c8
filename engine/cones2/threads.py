"""CPU thread count for torch, set once at a command's start (`--threads` on every command).

The default fits the machine's state at that moment (issue 29; measured in bench/results/threads.md):
with no other runnable task, every usable core; with fewer others than cores, only the free cores
(a thread sharing a core would hold every parallel region back); with as many others as cores, every
core again (each core evenly shared: threads keep pace, and a fair scheduler gives a share per
thread); with more others than cores, one thread. Measured on 2 cores, whole processes: idle, 2
threads beat 1 by 1.5x; beside one busy process, 1 beat 2 by 5 %; beside two, 2 beat 1 by 1.4x;
under heavy load (8-19) one thread was many times faster. All capped by torch's own choice.
"Busy" is read as the runnable tasks the kernel reports at this instant (not the load average,
which still counts this command's own previous runs for a minute). `--threads` and
OMP_NUM_THREADS, when set, always win.
"""
from __future__ import annotations

import os
import statistics
import time

from .errors import Cones2Error, quote

BUSY_SAMPLES = 5            # reads of the run queue, BUSY_INTERVAL_S apart (about 40 ms in all)
BUSY_INTERVAL_S = 0.01


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _runnable_tasks() -> int | None:
    """Tasks running or ready to run machine-wide right now, this one included (Linux /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def busy_cores() -> float:
    """How many of this process's usable cores other work occupies now: the median of a few reads of
    the run queue less this process, scaled from the whole machine to the usable cores. Off Linux, the
    1-minute load average stands in."""
    total = os.cpu_count() or 1
    reads = []
    for i in range(BUSY_SAMPLES):
        runnable = _runnable_tasks()
        if runnable is None:
            break
        reads.append(max(0, runnable - 1))
        if i + 1 < BUSY_SAMPLES:
            time.sleep(BUSY_INTERVAL_S)
    others = statistics.median(reads) if reads else os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return others * usable_cores() / max(total, usable_cores())


def default_threads() -> int:
    """The thread count `configure_threads(None)` applies (see the module docstring)."""
    import torch  # here, not at the top: commands check their flags before paying for torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()          # torch read it at start-up
    cores = usable_cores()
    others = int(busy_cores() + 0.5)
    if others > cores:                     # oversubscribed: parallel regions would wait on descheduled threads
        return 1
    free = cores - others
    return max(1, min(free if free > 0 else cores, torch.get_num_threads()))


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
