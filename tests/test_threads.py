"""`cones2.threads`: `--threads` values are checked, and the default rule fits the run queue at start (free
cores; every core when evenly shared; one when oversubscribed; bench/results/threads.md), capped by torch's
count; OMP_NUM_THREADS first."""
from __future__ import annotations

import pytest
import torch

import cones2
from cones2 import threads


@pytest.fixture(autouse=True)
def _restore():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value", [0, -2, 1025, 2.0, True, "4"])
def test_bad_counts_name_the_field(value):
    with pytest.raises(cones2.Cones2Error) as info:
        threads.configure_threads(value)
    assert str(info.value).startswith("threads: must be an integer in [1, 1024], got ")


def test_an_explicit_count_is_applied():
    assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert threads.configure_threads(2) == 2 and torch.get_num_threads() == 2


def _machine(monkeypatch, *, usable: int, total: int, runnable):
    """A machine of `total` cores, `usable` of them ours, whose run queue reads `runnable` (an int, or a
    list read in turn) at this instant; torch's own default stands at 8 threads."""
    reads = iter(runnable if isinstance(runnable, list) else [runnable] * threads.BUSY_SAMPLES)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: usable)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: total)
    monkeypatch.setattr(threads, "_runnable_tasks", lambda: next(reads))
    monkeypatch.setattr(threads, "BUSY_INTERVAL_S", 0.0)
    torch.set_num_threads(8)


@pytest.mark.parametrize("usable,total,runnable,expected", [
    (2, 2, 1, 2),      # idle 2-core machine (only this process runnable): both cores
    (2, 2, 2, 1),      # one other busy process: the free core only
    (2, 2, 3, 2),      # two others, one per core: both again (evenly shared; measured 1.4x faster than 1)
    (2, 2, 4, 1),      # three others on two cores: oversubscribed, one thread
    (2, 2, 12, 1),     # heavy load: one thread
    (1, 1, 1, 1),
    (16, 16, 1, 8),    # idle many-core machine: torch's own choice caps it
    (16, 16, 12, 5),   # 11 others on 16 cores: the 5 free ones
    (16, 16, 17, 8),   # 16 others on 16 cores: every core, capped by torch's 8
    (16, 16, 20, 1),   # 19 others on 16 cores: one thread
    (2, 64, 97, 1),    # 2 of 64 cores ours, 96 others machine-wide: 3 per 2 of our cores
    (2, 64, 3, 2),     # 2 of 64 cores ours, 2 others machine-wide: ours are free
])
def test_default_rule_fits_the_run_queue(monkeypatch, usable, total, runnable, expected):
    _machine(monkeypatch, usable=usable, total=total, runnable=runnable)
    assert threads.configure_threads(None) == expected and torch.get_num_threads() == expected


def test_a_momentary_spike_in_the_run_queue_is_ignored(monkeypatch):
    _machine(monkeypatch, usable=2, total=2, runnable=[1, 9, 1, 1, 1])
    assert threads.default_threads() == 2
    _machine(monkeypatch, usable=2, total=2, runnable=[2, 1, 2, 2, 1])
    assert threads.default_threads() == 1


def test_without_a_run_queue_the_load_average_stands_in(monkeypatch):
    _machine(monkeypatch, usable=2, total=2, runnable=None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.2, 0.5, 0.3))
    assert threads.default_threads() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.5, 0.3))
    assert threads.default_threads() == 2


def test_the_run_queue_is_read_from_this_machine():
    runnable = threads._runnable_tasks()
    if runnable is None:
        pytest.skip("no /proc/stat here (not Linux)")
    assert runnable >= 1, "this process itself is running while it reads"


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    torch.set_num_threads(3)                      # what torch read from OMP_NUM_THREADS at start-up
    assert threads.configure_threads(None) == 3
