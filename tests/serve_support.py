"""Helpers shared by the tests/test_serve_*.py files: in-process servers on 127.0.0.1, residuals, and
a slowed-down engine (the tiny model is too fast to test queueing, deadlines and draining)."""
from __future__ import annotations

import contextlib
import time

import torch

import cones2


def make_residual(seed: int = 0, rows: int = 1, dim: int = 32, word: str | None = "dog") -> cones2.Residual:
    g = torch.Generator().manual_seed(seed)
    return cones2.Residual(torch.randn(rows, dim, generator=g) * 0.3, word=word)


class SlowEngine:
    """An engine whose sampling steps each take at least `step_seconds` longer: it wraps the public
    `generate_batch(on_step=...)` callback with a sleep. Everything else is the wrapped engine."""

    def __init__(self, engine: cones2.Engine, step_seconds: float):
        self._engine, self.step_seconds = engine, step_seconds

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, requests, *, on_step=None, **kw):
        def slow_step(i, n, latents):
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(i, n, latents)

        return self._engine.generate_batch(requests, on_step=slow_step, **kw)


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
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(poll)


def png_bytes(colors: dict[tuple[int, int, int], tuple[slice, slice]], size: int = 64, text_chunks: int = 0) -> bytes:
    """A flat-colour PNG (black elsewhere); `text_chunks` adds that many 1 MiB zTXt chunks (each a
    few KiB compressed), the memory bomb a decoder would inflate when opening the file."""
    import io

    import numpy as np
    from PIL import Image, PngImagePlugin

    arr = np.zeros((size, size, 3), np.uint8)
    for rgb, (rows, cols) in colors.items():
        arr[rows, cols] = rgb
    info = None
    if text_chunks:
        info = PngImagePlugin.PngInfo()
        for i in range(text_chunks):
            info.add_text(f"k{i}", "x" * (1 << 20), zip=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


_HUGE: list[bytes] = []


def huge_png() -> bytes:
    """A 4096x4096 single-colour PNG: about 50 KB on the wire, 64 MiB once decoded (made once)."""
    if not _HUGE:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4096, 4096), (255, 0, 0)).save(buf, format="PNG")
        _HUGE.append(buf.getvalue())
    return _HUGE[0]


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Samples resident memory every 20 ms while the block runs; `.peak` is the largest sample."""

    def __enter__(self) -> "PeakRSS":
        import threading

        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
