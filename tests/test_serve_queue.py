"""Behaviour under load and faults: bounded queue, deadlines, cancellation, cross-request batching
(results equal single requests), and a failing request never takes the worker or its batch down.

The tiny model is fast, so these servers run `SlowEngine` (tests/serve_support.py): the public
`on_step` callback of `generate_batch` sleeps DELAY seconds per step."""
from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import cones2
from cones2.serve.client import Client, build_request
from serve_support import SlowEngine, make_residual, running_server, wait_for

SIZE = 64
DELAY = 0.05


def _req(prompt="a dog and a mug", steps=3, size=SIZE, **kw):
    return build_request(prompt, steps=steps, width=size, height=size, **kw)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _running(server) -> int:
    return server.jobs.stats.running


def test_full_queue_is_rejected_at_once_and_cancelling_frees_slots(tiny_engine, tmp_path):
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_queue=1, max_batch=1) as s, \
            Client(s.address) as c:
        running = c.stub.Generate.future(_req(steps=100))          # >= 5 s if it ran to the end
        wait_for(lambda: _running(s) == 1)
        queued = c.stub.Generate.future(_req(steps=100, seed=1))
        wait_for(lambda: s.jobs.depth() == 1)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(_req(steps=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 1.0, "rejection must not wait for the queue"
        queued.cancel()
        wait_for(lambda: s.jobs.depth() == 0, timeout=1.0)          # the queued slot is free now
        t0 = time.monotonic()
        running.cancel()
        wait_for(lambda: _running(s) == 0, timeout=3.0)
        assert time.monotonic() - t0 < 1.5, "the worker must stop within about one step"
        assert s.jobs.stats.jobs_run == 1 and s.jobs.stats.jobs_dropped == 1   # the queued one never ran
        assert c.stub.Generate(_req(steps=2), timeout=30).image


def test_deadline_shorter_than_the_run(tiny_engine, tmp_path):
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_batch=1) as s, Client(s.address) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(_req(steps=100), timeout=0.5)          # would need >= 5 s
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: _running(s) == 0, timeout=3.0)
        assert time.monotonic() - t0 < 2.0, "the expired request must release the worker within about one step"
        out = c.stub.Generate(_req(steps=2, seed=5), timeout=30)
        want = tiny_engine.generate("a dog and a mug", steps=2, seed=5, width=SIZE, height=SIZE, progress=False)
        assert np.array_equal(_pixels(out.image), np.asarray(want.image))
        codes = s.metrics.requests
        assert codes.labels("Generate", "DEADLINE_EXCEEDED")._value.get() == 1


def test_request_whose_deadline_passes_in_the_queue_never_runs(tiny_engine, tmp_path):
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=20, size=128))
        wait_for(lambda: _running(s) == 1)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(_req(steps=2), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert blocker.result(timeout=30).image
        wait_for(lambda: _running(s) == 0)
        assert s.jobs.stats.jobs_run == 1 and s.jobs.stats.jobs_dropped == 1


def test_concurrent_requests_are_batched_and_equal_sequential_ones(tiny_engine, tmp_path):
    dog = make_residual(4)
    specs = [dict(prompt="a dog and a mug", seed=1, subjects={"dog": dog}, boxes={"dog": (0, 0, 0.5, 1)}),
             dict(prompt="a mug on a table", seed=2, boxes={"mug": (0.25, 0.25, 0.75, 0.75)}, output="latents"),
             dict(prompt="a dog", seed=3, cfg_scale=3.0),
             dict(prompt="a dog on the beach", seed=4, subjects={"dog": dog}, output="latents",
                  boxes={"dog": (0.5, 0, 1, 1)}, strengths={"dog": 4.0}, guidance_weight=0.5)]
    odd = dict(prompt="a dog", seed=5, steps=2)        # another step count: a batch of its own
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=6, size=128))
        wait_for(lambda: _running(s) == 1)
        futures = [c.stub.Generate.future(_req(**({"steps": 3} | spec)), timeout=60) for spec in specs + [odd]]
        wait_for(lambda: s.jobs.depth() == len(futures))
        results = [f.result() for f in futures]
        assert blocker.result().batch_size == 1
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 1]
    for spec, r in zip(specs + [odd], results):
        spec = {"steps": 3} | spec
        layout = cones2.Layout.from_boxes(spec.pop("boxes"), spec.pop("strengths", {})) if "boxes" in spec else None
        output = spec.pop("output", "png")
        want = tiny_engine.generate(spec.pop("prompt"), spec.pop("subjects", None), layout, width=SIZE, height=SIZE,
                                    progress=False, **spec)
        if output == "latents":   # batched sampling matches single requests up to float rounding
            from safetensors.torch import load

            torch.testing.assert_close(load(r.latents)["latents"], want.latents, atol=1e-4, rtol=1e-4)
        else:
            diff = np.abs(_pixels(r.image).astype(int) - np.asarray(want.image, dtype=int))
            assert diff.max() <= 1, diff.max()


def test_cancelling_one_member_of_a_batch_keeps_the_others(tiny_engine, tmp_path):
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=4, size=128))
        wait_for(lambda: _running(s) == 1)
        doomed = c.stub.Generate.future(_req(steps=12, seed=1))
        kept = c.stub.Generate.future(_req(steps=12, seed=2))
        wait_for(lambda: _running(s) == 2, timeout=10)
        doomed.cancel()
        out = kept.result(timeout=30)
        assert doomed.cancelled() and blocker.result().image
        assert out.batch_size == 2
        want = tiny_engine.generate("a dog and a mug", steps=12, seed=2, width=SIZE, height=SIZE, progress=False)
        assert np.abs(_pixels(out.image).astype(int) - np.asarray(want.image, dtype=int)).max() <= 1


class _FlakyEngine:
    """The tiny engine, except that any batch holding a prompt with "boom" raises like a CUDA fault."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, requests, **kw):
        if any("boom" in r.prompt for r in requests):
            raise RuntimeError("simulated device failure")
        return self._engine.generate_batch(requests, **kw)


def test_a_failing_request_does_not_take_down_its_batch_or_the_worker(tiny_engine, tmp_path):
    with running_server(_FlakyEngine(SlowEngine(tiny_engine, DELAY)), tmp_path, max_batch=4) as s, \
            Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=4, size=128))
        wait_for(lambda: _running(s) == 1)
        bad = c.stub.Generate.future(_req("a dog goes boom", seed=1))
        good = c.stub.Generate.future(_req("a dog", seed=2))
        wait_for(lambda: s.jobs.depth() == 2)
        assert good.result(timeout=30).image and blocker.result(timeout=30).image
        with pytest.raises(grpc.RpcError) as err:
            bad.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "simulated" not in err.value.details()          # no internals in replies
        assert all(w.is_alive() for w in s.workers)
        assert c.stub.Generate(_req(steps=1), timeout=30).image


def test_many_concurrent_clients_with_mixed_prompts_all_succeed(tiny_engine, tmp_path):
    """Validation (RPC threads) and encoding (worker) tokenize at the same time: must not interfere."""
    import threading

    prompts = ["a dog", "a dog and a mug on the beach at sunset with friends", "a photo of a dog on a table"]
    failures, done = [], []
    with running_server(tiny_engine, tmp_path, max_batch=4) as s, Client(s.address, timeout=60) as c:
        def hammer(k: int) -> None:
            for i in range(12):
                p = prompts[(k + i) % len(prompts)]
                try:
                    c.stub.Generate(_req(p, steps=1, seed=i, boxes={"dog": (0, 0, 0.5, 1)}), timeout=60)
                    done.append(1)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == [] and len(done) == 72


def test_two_workers_each_with_their_own_engine_run_in_parallel(tiny_model_dir, tmp_path):
    from cones2.serve.server import ServeOptions, Server

    engines = []

    def load():
        engines.append(cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa"))
        return SlowEngine(engines[-1], DELAY)

    s = Server(load, ServeOptions(port=0, residual_store=str(tmp_path), workers=2, max_batch=1))
    s.start()
    try:
        assert s.wait_ready(120)
        assert len(engines) == 2 and engines[0] is not engines[1]
        with Client(s.address, timeout=60) as c:
            futures = [c.stub.Generate.future(_req(steps=8, seed=i)) for i in range(2)]
            wait_for(lambda: _running(s) == 2, timeout=10)            # both workers busy at once
            outs = [f.result() for f in futures]
        for i, out in enumerate(outs):
            want = engines[0].generate("a dog and a mug", steps=8, seed=i, width=SIZE, height=SIZE, progress=False)
            assert np.array_equal(_pixels(out.image), np.asarray(want.image))
    finally:
        s.stop(grace=0.5)


def test_cancelling_a_stream_stops_its_generation(tiny_engine, tmp_path):
    with running_server(SlowEngine(tiny_engine, DELAY), tmp_path, max_batch=1) as s, Client(s.address) as c:
        call = c.stub.GenerateStream(_req(steps=100), timeout=60)          # >= 5 s if it ran to the end
        assert [next(call).progress.step for _ in range(2)] == [1, 2]
        t0 = time.monotonic()
        call.cancel()
        wait_for(lambda: _running(s) == 0, timeout=3.0)
        assert time.monotonic() - t0 < 1.5
        wait_for(lambda: s.metrics.requests.labels("GenerateStream", "CANCELLED")._value.get() == 1, timeout=3.0)
        assert c.stub.Generate(_req(steps=1), timeout=30).image
