"""`cones2-engine serve` as a real process: it prints where it serves and its thread count; on SIGTERM
health turns NOT_SERVING with the port still open, new calls get UNAVAILABLE, the request in flight
finishes, and the process exits 0.

The request in flight is made long honestly (256 px, 40 steps of the tiny model on one thread: a few
seconds), and the test knows it is running from its first streamed progress event."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
import pytest

from cones2.serve.client import Client, build_request
from serve_support import wait_for

STEPS = 40


def _health(client) -> str:
    try:
        return client.health(timeout=2)
    except grpc.RpcError as exc:      # once the port closes, probes get UNAVAILABLE
        return exc.code().name


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_with_health_not_serving_then_exits_0(tiny_model_dir, tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "serve",
           "--model", str(tiny_model_dir), "--port", "0", "--threads", "1", "--residual-store", str(tmp_path / "store"),
           "--grace", "120", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"SERVING on (\S+) \(1 worker\(s\), 1 torch thread\(s\)\)", line)
        assert match, f"no SERVING line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with Client(match.group(1), timeout=120) as c:
            assert c.health() == "SERVING"
            stream = c.stub.GenerateStream(build_request("a dog", steps=STEPS, width=256, height=256, seed=1),
                                           timeout=120)
            assert next(stream).progress.step == 1                      # sampling has started
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _health(c) != "SERVING", timeout=10)       # the server saw the signal
            assert _health(c) == "NOT_SERVING"                          # draining: the port is still open
            with pytest.raises(grpc.RpcError) as err:                   # no new work once stopping
                c.stub.Generate(build_request("a dog", steps=1, width=64, height=64), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            events = list(stream)                                       # the request in flight completes
            assert [e.progress.step for e in events[:-1]][-1] == STEPS
            assert events[-1].result.image.startswith(b"\x89PNG") and events[-1].result.width == 256
        assert proc.wait(timeout=60) == 0
        assert _port_closed(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _port_closed(target: str) -> bool:
    import socket

    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0
