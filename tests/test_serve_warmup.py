"""Warm-up is one behaviour for every transport: `cones2.serve.core.Worker` runs `warm_up` before
ready, in-process and in each Ray Serve replica alike (a replica is a `Core` with one worker)."""
from __future__ import annotations

import pytest

from cones2.serve.core import CoreOptions, JobQueue, Worker


class _FakeEngine:
    """Records what a serve worker asks `warmup` for; `compile` marks a compiled engine."""

    def __init__(self, compile: bool):
        self.compile, self.warmups, self.smoke = compile, [], 0

    def warmup(self, resolutions=None, batch_sizes=(1,)):
        self.warmups.append((resolutions, list(batch_sizes)))
        return {(64, 64, b): 0.01 for b in batch_sizes}

    def request(self, *a, **kw):
        return None

    def generate_batch(self, requests, progress=True):
        self.smoke += 1
        return []


@pytest.mark.parametrize("compile,resolutions,batch_sizes,expect", [
    (False, (), (), None),                                          # eager, nothing configured: 64-px smoke run
    (True, (), (), (None, [1, 2, 3])),                              # compiled: model resolution, 1..max_batch
    (False, ((512, 512), (512, 768)), (2,), ([(512, 512), (512, 768)], [2])),
])
def test_a_worker_warms_the_configured_shapes_before_ready(compile, resolutions, batch_sizes, expect):
    engine = _FakeEngine(compile)
    jobs = JobQueue(4)
    options = CoreOptions(max_batch=3, warmup_resolutions=resolutions, warmup_batch_sizes=batch_sizes)
    worker = Worker("w", lambda: engine, jobs, options, on_batch=lambda n: None)
    worker.start()
    assert worker.ready.wait(60) and worker.error is None
    jobs.close()
    worker.join(60)
    if expect is None:
        assert engine.smoke == 1 and engine.warmups == []
    else:
        assert engine.warmups == [expect] and engine.smoke == 0


def test_warmup_batch_sizes_are_bounded_by_max_batch():
    from cones2 import Cones2Error

    with pytest.raises(Cones2Error, match="outside"):
        CoreOptions(max_batch=2, warmup_batch_sizes=(1, 4))
