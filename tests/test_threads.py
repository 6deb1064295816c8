"""`cones2.threads`: `--threads` values are checked, and the measured default rule picks one thread on
machines of at most 2 usable cores (bench/results/threads.md), torch's count elsewhere, OMP_NUM_THREADS first."""
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


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (3, 3), (16, 3)])
def test_default_rule(monkeypatch, cores, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    torch.set_num_threads(3)                      # stands for torch's own choice on a bigger machine
    assert threads.configure_threads(None) == expected and torch.get_num_threads() == expected


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    torch.set_num_threads(3)                      # what torch read from OMP_NUM_THREADS at start-up
    assert threads.configure_threads(None) == 3
