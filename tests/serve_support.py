"""Helpers shared by the tests/test_serve_*.py files: in-process servers on 127.0.0.1, residuals."""
from __future__ import annotations

import contextlib

import torch

import cones2


def make_residual(seed: int = 0, rows: int = 1, dim: int = 32, word: str | None = "dog") -> cones2.Residual:
    g = torch.Generator().manual_seed(seed)
    return cones2.Residual(torch.randn(rows, dim, generator=g) * 0.3, word=word)


@contextlib.contextmanager
def running_server(engine, store_dir, **options):
    """A started, SERVING server on 127.0.0.1:<free port> whose one worker uses `engine`."""
    from cones2.serve.server import ServeOptions, Server

    opts = {"host": "127.0.0.1", "port": 0, "residual_store": str(store_dir), "grace_seconds": 2.0} | options
    server = Server(lambda: engine, ServeOptions(**opts)).start()
    try:
        assert server.wait_ready(60), "server did not become ready"
        yield server
    finally:
        server.stop(grace=0.5)


def wait_for(predicate, timeout: float = 10.0, poll: float = 0.005) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(poll)
