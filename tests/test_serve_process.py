"""`cones2-engine serve` as an operator runs it: every port listens on --host only (read from the
process's own sockets in /proc), SIGTERM exits 0; a server that would listen beyond loopback
without a token, or Ray Serve's gRPC proxy (every interface) without an explicit flag, refuses to
start with one line naming --host. The drain itself: tests/test_serve_acceptance.py."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from cones2.cli import main
from serve_support import listening_sockets

HANG_S = 300      # only catches a hang: starting torch and the model on a loaded 2-core machine is slow


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_every_port_listens_on_host_only_and_sigterm_exits_0(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "serve",
           "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
           "--metrics-port", "0", "--threads", "1", "--residual-store", str(tmp_path / "store"), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        match = re.search(r"SERVING on 127\.0\.0\.1:(\d+) .*HTTP/JSON on http://127\.0\.0\.1:(\d+)/v1, "
                          r"studio on (http://127\.0\.0\.1:(\d+)/), metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, f"no SERVING line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        grpc_port, http_port, studio, studio_port, metrics_port = match.groups()
        assert studio_port == http_port
        with urllib.request.urlopen(studio, timeout=60) as page:             # the banner's studio URL works
            assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
            assert b"<canvas" in page.read()
        ports = {int(grpc_port), int(http_port), int(metrics_port)}
        sockets = listening_sockets(proc.pid)
        assert {port for _, port in sockets} == ports, sockets                   # these three, no others
        assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets     # on --host only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("flags, message", [
    (["--host", "0.0.0.0"], "host: refusing to listen on 0.0.0.0 without a token"),
    (["--host", "::"], "host: refusing to listen on :: without a token"),
    (["--ray", "--host", "127.0.0.1"], "host: Ray Serve's gRPC proxy listens on every interface whatever --host "
                                       "says; pass --ray-grpc-every-interface"),
    (["--ray", "--ray-grpc-every-interface"], "host: refusing to listen on every interface without a token"),
])
def test_listening_beyond_loopback_needs_a_token_or_words_saying_so(flags, message, capsys):
    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
