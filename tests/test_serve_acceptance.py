"""One acceptance suite for every transport of the serving core: in-process gRPC and HTTP/JSON here
(Ray Serve runs the shared checks of `serve_acceptance` in tests/test_serve_ray.py, where its one
Ray instance lives).

Backpressure, cancellation, a drain on SIGTERM, a worker killed under concurrent clients, a residual
registered through one entry and used through every other, and the seeded fuzz run. No wall-clock
limits: the engine's steps wait for the test (`SteppedEngine`), and progress is read from the
server's counters; `wait_for`'s deadlines only catch hangs.
"""
from __future__ import annotations

import collections
import io
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import cones2
import serve_acceptance as acceptance
from cones2.serve import cones2_pb2 as pb
from cones2.serve.client import build_request
from cones2.serve.server import ServeOptions, Server
from serve_support import (Failed, GrpcTransport, HttpTransport, SteppedEngine, make_residual, running_server,
                           transport, wait_for)

SIZE = 64
TRANSPORTS = ["grpc", "http"]
HANG_S = 120      # deadlines that only catch a hung test (a loaded 2-core machine is slow, never this slow)


@pytest.fixture(params=TRANSPORTS)
def kind(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """As `serve --threads 1`: clients, server and engine share a small machine (docs/serve.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _req(prompt="a dog and a mug", steps=3, **kw) -> pb.GenerateRequest:
    return build_request(prompt, steps=steps, **{"width": SIZE, "height": SIZE} | kw)


def _counted(server, method: str, code: str) -> float:
    return server.metrics.requests.labels(method, code)._value.get()


# ---- backpressure ---------------------------------------------------------------------------------
def test_a_full_queue_refuses_at_once_and_a_cancelled_request_frees_its_slot(kind, tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path, max_queue=1, max_batch=1) as s:
        t = transport(kind, s)
        running = t.start(_req(steps=5))
        wait_for(lambda: s.jobs.stats.running == 1, HANG_S)
        queued = t.start(_req(steps=5, seed=1))
        wait_for(lambda: s.jobs.depth() == 1, HANG_S)
        with pytest.raises(Failed) as err:
            t.generate(_req(steps=2))
        assert err.value.code == "RESOURCE_EXHAUSTED", err.value
        if kind == "http":
            assert err.value.http_status == 429 and err.value.retry_after == 1
        assert engine.steps_run == 0                         # refused without waiting for the running one
        queued.cancel()
        with pytest.raises(Failed) as err:
            queued.result(HANG_S)
        assert err.value.code == "CANCELLED"
        wait_for(lambda: s.jobs.depth() == 0, HANG_S)                       # its slot is free...
        assert s.jobs.stats.jobs_dropped == 1                               # ... and it never ran
        later = t.start(_req(steps=2, seed=2))
        wait_for(lambda: s.jobs.depth() == 1, HANG_S)                      # the freed slot took it
        engine.run_freely()
        assert running.result(HANG_S).width == SIZE and later.result(HANG_S).seed == 2
        assert s.jobs.stats.jobs_run == 2


# ---- cancellation ---------------------------------------------------------------------------------
def test_cancelling_a_stream_stops_its_sampling_loop(kind, tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine, permits=2)
    with running_server(engine, tmp_path, max_batch=1) as s:
        t = transport(kind, s)
        events, cancel = t.stream(_req(steps=50))
        assert [next(events).progress.step for _ in range(2)] == [1, 2]
        cancel()
        wait_for(lambda: _counted(s, "GenerateStream", "CANCELLED") == 1, HANG_S)
        engine.run_freely()                                  # were it still running, it would finish now
        wait_for(lambda: s.jobs.stats.running == 0, HANG_S)
        assert engine.steps_run <= 3, f"{engine.steps_run} of 50 steps ran after the cancel"
        assert t.generate(_req(steps=1)).width == SIZE


def test_an_http_client_that_disconnects_cancels_its_generation(tiny_engine, tmp_path):
    import http.client
    import json

    from google.protobuf import json_format

    engine = SteppedEngine(tiny_engine, permits=1)
    with running_server(engine, tmp_path, max_batch=1) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=HANG_S)
        conn.request("POST", "/v1/generate/stream", json_format.MessageToJson(_req(steps=50)),
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.readline())["progress"]["step"] == 1
        conn.sock.shutdown(2)
        conn.close()
        wait_for(lambda: _counted(s, "GenerateStream", "CANCELLED") == 1, HANG_S)
        engine.run_freely()
        wait_for(lambda: s.jobs.stats.running == 0, HANG_S)
        assert engine.steps_run <= 2, f"{engine.steps_run} of 50 steps ran after the client left"


# ---- drain on SIGTERM -----------------------------------------------------------------------------
# A server process run by the CLI's own serve loop (`serve_until_signal`) over a SteppedEngine whose
# steps are released by lines on its stdin, so the request is in flight when SIGTERM arrives.
DRAIN_SCRIPT = """
import sys, threading
sys.path.insert(0, {tests!r})
import cones2
from cones2.cli.serve import serve_until_signal
from cones2.serve.server import ServeOptions, Server
from serve_support import SteppedEngine
engine = SteppedEngine(cones2.Engine.from_pretrained({model!r}, backend="sdpa"))
threading.Thread(target=lambda: [engine.allow(1) for _ in sys.stdin], daemon=True).start()
server = Server(lambda: engine, ServeOptions(port=0, http_port=0, residual_store={store!r}, grace_seconds=300,
                                             warmup=False))
sys.exit(serve_until_signal(server.start, lambda: server.wait_ready(0.2), server.stop,
                            lambda: f"SERVING on {{server.address}} HTTP {{server.http_port}}", 300))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_with_not_serving_then_exits_0(tiny_model_dir, tmp_path):
    """Both transports in one process (starting one costs most of this test): SIGTERM turns health
    NOT_SERVING on both while a running request (gRPC) and a queued one (HTTP) complete; new calls
    get UNAVAILABLE on both; then exit 0 with both ports closed."""
    script = DRAIN_SCRIPT.format(tests=os.path.dirname(__file__), model=str(tiny_model_dir), store=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def release(steps: int) -> None:
        proc.stdin.write("step\n" * steps)
        proc.stdin.flush()

    try:
        line = proc.stdout.readline()
        match = re.search(r"SERVING on (\S+) HTTP (\d+)", line)
        assert match, f"no SERVING line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        grpc_target, http_port = match.group(1), int(match.group(2))
        clients = {"grpc": GrpcTransport(grpc_target), "http": HttpTransport(f"http://127.0.0.1:{http_port}")}
        running, _ = clients["grpc"].stream(_req(steps=4, seed=1))
        release(1)
        assert next(running).progress.step == 1                               # sampling has started
        queued, _ = clients["http"].stream(_req(steps=4, seed=2, width=128))   # another batch key: it waits
        wait_for(lambda: _metric(clients["http"], "cones2_queue_depth") == 1, HANG_S)
        proc.send_signal(signal.SIGTERM)
        for name, t in clients.items():
            wait_for(lambda: t.health() != "SERVING", HANG_S)
            assert t.health() == "NOT_SERVING", name                          # draining: the port is open
            with pytest.raises(Failed) as err:
                t.generate(_req(steps=1))
            assert err.value.code == "UNAVAILABLE" and err.value.http_status in (None, 503), name
        assert _metric(clients["http"], "cones2_running_requests") == 1        # ... with the work in flight
        release(3 + 4)
        for stream, seed in ((running, 1), (queued, 2)):                       # both complete
            events = list(stream)
            assert events[-2].progress.step == 4 and events[-1].result.seed == seed
        assert proc.wait(timeout=HANG_S) == 0
        assert acceptance.port_closed(grpc_target) and acceptance.port_closed(f"127.0.0.1:{http_port}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def _metric(http: HttpTransport, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(http.client.base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# ---- a worker killed under concurrent clients -----------------------------------------------------
class _Recording:
    """The worker's engine; records every request it finished (by seed), and dies (SystemExit in its
    worker thread) during its `die_on`-th batch, mid-sampling."""

    def __init__(self, engine, finished: collections.Counter, lock: threading.Lock, die_on: int | None = None):
        self._engine, self.finished, self.lock, self.die_on, self.batches = engine, finished, lock, die_on, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, requests, *, on_step=None, **kw):
        self.batches += 1

        def step(i, n, latents):
            if self.batches == self.die_on and i == 1:
                raise SystemExit("the worker was killed")
            if on_step is not None:
                on_step(i, n, latents)

        out = self._engine.generate_batch(requests, on_step=step, **kw)
        with self.lock:
            self.finished.update(r.config.seed for r in requests)
        return out


def test_a_worker_killed_under_concurrent_clients_loses_nothing(kind, tiny_model_dir, tiny_engine, tmp_path):
    finished, lock = collections.Counter(), threading.Lock()
    engines = iter([cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa") for _ in range(2)])
    recorders = [_Recording(next(engines), finished, lock, die_on=3), _Recording(next(engines), finished, lock)]
    factory = iter(recorders).__next__
    server = Server(factory, ServeOptions(port=0, http_port=0, residual_store=str(tmp_path), workers=2, max_batch=2,
                                          grace_seconds=1, warmup=False)).start()
    try:
        assert server.wait_ready(HANG_S)
        report = acceptance.concurrent_clients_with_retries(lambda: transport(kind, server), clients=6, per_client=4,
                                                            make=lambda rid: _req(steps=4, seed=rid))
        assert not server.workers[0].is_alive() and server.workers[1].is_alive()    # the kill happened
        acceptance.check_nothing_lost(report, finished)
        want = tiny_engine.generate("a dog and a mug", seed=report.retried[0], steps=4, width=SIZE, height=SIZE,
                                    progress=False)
        got = Image.open(io.BytesIO(report.answers[report.retried[0]][0].image))
        diff = np.abs(np.asarray(got, int) - np.asarray(want.image, int))
        assert diff.max() <= 1                       # a retried one is right (batched: float rounding)
        assert transport(kind, server).health() == "SERVING"                        # one worker still serves
    finally:
        server.stop(grace=0)


def test_health_turns_not_serving_on_every_transport_once_every_worker_died(tiny_engine, tmp_path):
    """The one worker dies mid-sampling: its request is answered UNAVAILABLE, and then gRPC health
    and HTTP /v1/health both say NOT_SERVING (a balancer stops sending), new calls UNAVAILABLE / 503."""
    dying = _Recording(tiny_engine, collections.Counter(), threading.Lock(), die_on=1)
    with running_server(dying, tmp_path, max_batch=1, warmup=False) as s:
        clients = {k: transport(k, s) for k in TRANSPORTS}
        assert {k: t.health() for k, t in clients.items()} == {"grpc": "SERVING", "http": "SERVING"}
        with pytest.raises(Failed) as err:
            clients["grpc"].generate(_req(steps=2))
        assert err.value.code == "UNAVAILABLE", err.value
        wait_for(lambda: not s.workers[0].is_alive(), HANG_S)
        assert {k: t.health() for k, t in clients.items()} == {"grpc": "NOT_SERVING", "http": "NOT_SERVING"}
        for name, t in clients.items():
            with pytest.raises(Failed) as err:
                t.generate(_req(steps=1))
            assert err.value.code == "UNAVAILABLE" and err.value.http_status in (None, 503), (name, err.value)


# ---- a residual registered through one entry, used through all --------------------------------------
def test_a_residual_registered_through_one_transport_is_used_through_every_one(kind, tiny_engine, tmp_path):
    dog = make_residual(7)
    with running_server(tiny_engine, tmp_path) as s:
        clients = {k: transport(k, s) for k in TRANSPORTS}
        rid = clients[kind].register(dog.to_safetensors_bytes())
        want = tiny_engine.generate("a dog and a mug", {"dog": dog}, cones2.Layout.from_boxes({"dog": (0, 0, .5, 1)}),
                                    seed=3, steps=2, width=SIZE, height=SIZE, progress=False)
        for name, t in clients.items():
            assert rid in [r.id for r in t.list()], name
            out = t.generate(_req(steps=2, seed=3, subjects={"dog": rid}, boxes={"dog": (0, 0, .5, 1)}))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.image))), np.asarray(want.image)), name


# ---- seeded fuzz ------------------------------------------------------------------------------------
def test_seeded_fuzz_gets_only_the_documented_answers(kind, tiny_engine, tmp_path):
    token = "fuzz-token"
    with running_server(tiny_engine, tmp_path, auth_token=token, max_queue=32, max_batch=4) as s:
        acceptance.fuzz_and_check(lambda token=token: transport(kind, s, token), s, seed=13 + TRANSPORTS.index(kind))
