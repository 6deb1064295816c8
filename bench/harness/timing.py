"""Timing and peak memory for the benchmarks, on library timers rather than hand-written loops.

`measure` times one call first. Calls of LONG_CALL_MS or more (whole generations) are then timed
one by one, exactly `repeat` runs, with stdlib `timeit` on torch.utils.benchmark's clock (which
synchronises the accelerator), so an expensive job costs exactly warmup + repeat calls. Shorter
calls are left to `triton.testing.do_bench` on CUDA (CUDA events, L2 flushed between runs; it picks
the run count) or `torch.utils.benchmark.Timer.blocked_autorange` elsewhere.
"""
from __future__ import annotations

import statistics
import timeit
from typing import Callable

import torch
import torch.utils.benchmark as torch_bench

LONG_CALL_MS = 50.0   # a call this long is timed singly: library autoranging would repeat it many times


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock() -> Callable[[], float]:
    """torch.utils.benchmark's timer function: the default clock, after synchronising the accelerator."""
    from torch.utils.benchmark.utils import timer as timer_module

    return getattr(timer_module, "timer", timeit.default_timer)


def _timed_calls(fn: Callable[[], object], device: torch.device, runs: int) -> list[float]:
    """`runs` single calls in ms, each bracketed by a device sync (exactly `runs` calls)."""
    synchronize(device)
    clock = _clock()
    return [t * 1e3 for t in timeit.Timer(fn, timer=clock).repeat(repeat=runs, number=1)]


def _do_bench(fn: Callable[[], object]) -> tuple[float, float, int | None] | None:
    """(min ms, median ms, runs) from triton.testing.do_bench, or None where Triton is not importable."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    try:
        times = list(do_bench(fn, warmup=25, rep=100, return_mode="all"))
        return min(times), statistics.median(times), len(times)
    except AssertionError:  # a Triton without return_mode="all": quantiles, run count unknown
        low, mid = do_bench(fn, warmup=25, rep=100, quantiles=[0.0, 0.5])
        return low, mid, None


def _autorange(fn: Callable[[], object], min_run_time: float) -> tuple[list[float], int]:
    """(per-call ms of each block, calls timed) from torch.utils.benchmark.Timer.blocked_autorange."""
    m = torch_bench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=min_run_time)
    return [t * 1e3 for t in m.times], len(m.times) * m.number_per_run


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> dict:
    """Min and median time of `fn()` in ms after `warmup` untimed calls.

    Returns {"median_ms", "min_ms", "runs", "timer"}. Ratios use the min: on a shared machine it
    is the run least disturbed by other work. `repeat` is exact for long calls; short ones run as
    often as their library timer decides (about 0.1-0.2 s in all).
    """
    for _ in range(max(0, warmup)):
        fn()
    repeat = max(1, repeat)
    first = _timed_calls(fn, device, 1)
    if first[0] >= LONG_CALL_MS:
        times = first + _timed_calls(fn, device, repeat - 1)
        return _row(min(times), statistics.median(times), repeat, "timeit + torch.utils.benchmark clock")
    bench = _do_bench(fn) if device.type == "cuda" else None
    if bench is not None:
        return _row(*bench, "triton.testing.do_bench")
    times, runs = _autorange(fn, min_run_time=max(0.1, repeat * first[0] / 1e3))
    return _row(min(times), statistics.median(times), runs, "torch.utils.benchmark.Timer")


def _row(low: float, mid: float, runs: int | None, timer: str) -> dict:
    return {"median_ms": mid, "min_ms": low, "runs": runs, "timer": timer}


class PeakMemory:
    """Peak memory torch allocates while the block runs, above what was live at entry (`.peak`, bytes).

    CUDA: the caching allocator's high-water mark. CPU: replayed from the torch profiler's
    allocation events (sorted by time, summed, maximum taken); temporaries allocated and freed
    inside one operator are not seen, so it is a lower bound there.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in self._prof.events()
                         if e.self_cpu_memory_usage)
        live = peak = 0
        for _, delta in changes:
            live += delta
            peak = max(peak, live)
        self.peak = peak
