"""`cones2-engine serve` as a real process: it prints where it serves, and on SIGTERM it stops
accepting, finishes the request in flight and exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from cones2.serve.client import Client, build_request
from serve_support import wait_for


def _health(client) -> str:
    try:
        return client.health(timeout=2)
    except grpc.RpcError as exc:      # once gRPC itself stops, probes get UNAVAILABLE
        return exc.code().name


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_in_flight_work_and_exits_0(tiny_model_dir, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "serve", "--model", str(tiny_model_dir), "--port", "0",
           "--residual-store", str(tmp_path / "store"), "--grace", "20", "--log-level", "WARNING",
           "--test-step-delay", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"SERVING on (\S+)", line)
        assert match, f"no SERVING line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with Client(match.group(1), timeout=60) as c:
            assert c.health() == "SERVING"
            in_flight = c.stub.Generate.future(build_request("a dog", steps=15, width=64, height=64, seed=1),
                                               timeout=60)                # ~1.5 s of sampling
            time.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _health(c) != "SERVING", timeout=10)         # the server saw the signal
            with pytest.raises(grpc.RpcError) as err:                     # no new work once stopping
                c.stub.Generate(build_request("a dog", steps=1, width=64, height=64), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert in_flight.result().image.startswith(b"\x89PNG")       # the in-flight request completed
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
