"""Behaviour under load and faults: bounded queue, deadlines, cancellation, cross-request batching
(results equal single requests), and a failing request never takes the worker or its batch down.

The tiny model is fast, so these servers run `SteppedEngine` (tests/serve_support.py): each step
waits for the test's permit, so "still running" and "queued" are states the test sets up, not
races it hopes to win; progress is read from the server's counters. Backpressure and cancellation
on every transport: tests/test_serve_acceptance.py."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import cones2
from cones2.serve.client import Client, build_request
from serve_support import SteppedEngine, make_residual, running_server, wait_for

SIZE = 64


def _req(prompt="a dog and a mug", steps=3, size=SIZE, **kw):
    return build_request(prompt, steps=steps, width=size, height=size, **kw)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _running(server) -> int:
    return server.jobs.stats.running


def test_deadline_shorter_than_the_run(tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine, permits=1)
    with running_server(engine, tmp_path, max_batch=1) as s, Client(s.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(_req(steps=100), timeout=0.5)          # its steps wait: the deadline passes
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: s.metrics.requests.labels("Generate", "DEADLINE_EXCEEDED")._value.get() == 1, 60)
        engine.run_freely()                                        # were it still running, it would finish
        wait_for(lambda: _running(s) == 0, 60)
        assert engine.steps_run <= 3, f"{engine.steps_run} of 100 steps ran after the deadline"
        out = c.stub.Generate(_req(steps=2, seed=5), timeout=60)
        want = tiny_engine.generate("a dog and a mug", steps=2, seed=5, width=SIZE, height=SIZE, progress=False)
        assert np.array_equal(_pixels(out.image), np.asarray(want.image))


def test_request_whose_deadline_passes_in_the_queue_never_runs(tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=20, size=128))
        wait_for(lambda: _running(s) == 1, 60)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(_req(steps=2), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        engine.run_freely()
        assert blocker.result(timeout=60).image
        wait_for(lambda: _running(s) == 0, 60)
        assert s.jobs.stats.jobs_run == 1 and s.jobs.stats.jobs_dropped == 1
        assert engine.steps_run == 20


def test_concurrent_requests_are_batched_and_equal_sequential_ones(tiny_engine, tmp_path):
    dog = make_residual(4)
    specs = [dict(prompt="a dog and a mug", seed=1, subjects={"dog": dog}, boxes={"dog": (0, 0, 0.5, 1)}),
             dict(prompt="a mug on a table", seed=2, boxes={"mug": (0.25, 0.25, 0.75, 0.75)}, output="latents"),
             dict(prompt="a dog", seed=3, cfg_scale=3.0),
             dict(prompt="a dog on the beach", seed=4, subjects={"dog": dog}, output="latents",
                  boxes={"dog": (0.5, 0, 1, 1)}, strengths={"dog": 4.0}, guidance_weight=0.5)]
    odd = dict(prompt="a dog", seed=5, steps=2)        # another step count: a batch of its own
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=6, size=128))
        wait_for(lambda: _running(s) == 1, 60)
        futures = [c.stub.Generate.future(_req(**({"steps": 3} | spec)), timeout=60) for spec in specs + [odd]]
        wait_for(lambda: s.jobs.depth() == len(futures), 60)
        engine.run_freely()
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
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=4, size=128))
        wait_for(lambda: _running(s) == 1, 60)
        doomed = c.stub.Generate.future(_req(steps=12, seed=1))
        kept = c.stub.Generate.future(_req(steps=12, seed=2))
        wait_for(lambda: s.jobs.depth() == 2, 60)
        engine.allow(4)                                            # the blocker's steps; the pair starts
        wait_for(lambda: _running(s) == 2, 60)
        doomed.cancel()
        wait_for(lambda: s.metrics.requests.labels("Generate", "CANCELLED")._value.get() == 1, 60)
        engine.run_freely()
        out = kept.result(timeout=60)
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
    engine = SteppedEngine(tiny_engine)
    with running_server(_FlakyEngine(engine), tmp_path, max_batch=4, warmup=False) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=4, size=128))
        wait_for(lambda: _running(s) == 1, 60)
        bad = c.stub.Generate.future(_req("a dog goes boom", seed=1))
        good = c.stub.Generate.future(_req("a dog", seed=2))
        wait_for(lambda: s.jobs.depth() == 2, 60)
        engine.run_freely()
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
        engines.append(SteppedEngine(cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa")))
        return engines[-1]

    s = Server(load, ServeOptions(port=0, residual_store=str(tmp_path), workers=2, max_batch=1, warmup=False))
    s.start()
    try:
        assert s.wait_ready(120)
        assert len(engines) == 2 and engines[0]._engine is not engines[1]._engine
        with Client(s.address, timeout=60) as c:
            futures = [c.stub.Generate.future(_req(steps=8, seed=i)) for i in range(2)]
            wait_for(lambda: _running(s) == 2, 60)                    # both workers busy at once
            for e in engines:
                e.run_freely()
            outs = [f.result() for f in futures]
        for i, out in enumerate(outs):
            want = engines[0].generate("a dog and a mug", steps=8, seed=i, width=SIZE, height=SIZE, progress=False)
            assert np.array_equal(_pixels(out.image), np.asarray(want.image))
    finally:
        s.stop(grace=0.5)
