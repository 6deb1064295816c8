"""Helpers shared by the tests/test_serve_*.py files: in-process servers on 127.0.0.1, residuals, an
engine whose steps the test releases one by one (the tiny model is too fast to test queueing,
deadlines and draining, and sleeping would make the tests depend on the machine's speed), one
client interface over every transport, and the sockets a process listens on."""
from __future__ import annotations

import contextlib
import time

import torch

import cones2


def make_residual(seed: int = 0, rows: int = 1, dim: int = 32, word: str | None = "dog") -> cones2.Residual:
    g = torch.Generator().manual_seed(seed)
    return cones2.Residual(torch.randn(rows, dim, generator=g) * 0.3, word=word)


class SteppedEngine:
    """An engine whose sampling steps wait for the test: each step takes one permit (`allow(n)`;
    `run_freely()` stops gating). `steps_run` counts the steps taken. A step waiting longer than
    HANG_S fails the generation: a deadline that only catches a hung test, never a slow machine."""

    HANG_S = 120.0

    def __init__(self, engine: cones2.Engine, permits: int = 0):
        import threading

        self._engine = engine
        self._permits = threading.Semaphore(permits)
        self._free = threading.Event()
        self._count_lock = threading.Lock()
        self.steps_run = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def run_freely(self) -> None:
        self._free.set()
        self.allow(1000)

    def generate_batch(self, requests, *, on_step=None, **kw):
        def gated_step(i, n, latents):
            if not self._free.is_set() and not self._permits.acquire(timeout=self.HANG_S):
                raise RuntimeError("SteppedEngine: no permit for a step (the test hung)")
            with self._count_lock:
                self.steps_run += 1
            if on_step is not None:
                on_step(i, n, latents)

        return self._engine.generate_batch(requests, on_step=gated_step, **kw)


@contextlib.contextmanager
def running_server(engine, store_dir, **options):
    """A started, SERVING server on 127.0.0.1:<free port> (gRPC; HTTP/JSON on another) whose one worker
    uses `engine` (a SteppedEngine is not warmed up: its steps wait for the test)."""
    from cones2.serve.server import ServeOptions, Server

    opts = {"host": "127.0.0.1", "port": 0, "http_port": 0, "residual_store": str(store_dir),
            "grace_seconds": 2.0, "warmup": not isinstance(engine, SteppedEngine)} | options
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


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, from /proc (Linux)."""
    import ipaddress
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:           # 0A: LISTEN
                    continue
                hexaddr, hexport = local.split(":")
                raw = bytes.fromhex(hexaddr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))   # per-word little endian
                address = ipaddress.ip_address(raw)
                address = getattr(address, "ipv4_mapped", None) or address      # ::ffff:127.0.0.1 -> 127.0.0.1
                found.add((str(address), int(hexport, 16)))
    return found


# ---- one client interface over every transport ----------------------------------------------------
class Failed(Exception):
    """A call's error answer, whatever the transport: the gRPC status name and message; HTTP adds its
    status and Retry-After."""

    def __init__(self, code: str, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.http_status, self.retry_after = code, message, http_status, retry_after


class Pending:
    """A generation running in the background: `.result()` (raises Failed) and `.cancel()`."""

    def __init__(self, run, cancel):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = self._pool.submit(run)
        self._cancel = cancel

    def result(self, timeout: float = 120.0):
        try:
            return self._future.result(timeout)
        finally:
            self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        self._cancel()


class _Transport:
    """What every transport's client shares: the residual calls and info, errors as `Failed`."""

    def register(self, data: bytes) -> str:
        return self._call(self.client.register_residual, data)

    def list(self) -> list:
        return self._call(self.client.list_residuals)

    def info(self):
        return self._call(self.client.info)

    def _events(self, it):
        while True:
            try:
                yield self._call(next, it)
            except StopIteration:
                return


class GrpcTransport(_Transport):
    name = "grpc"

    def __init__(self, target: str, token: str | None = None):
        from cones2.serve.client import Client

        self.client = Client(target, token=token, timeout=120)

    def close(self) -> None:
        self.client.close()

    def _call(self, fn, *a, **kw):
        import grpc

        try:
            return fn(*a, **kw)
        except grpc.RpcError as exc:
            raise Failed(exc.code().name, exc.details() or "") from None

    def generate(self, request, timeout: float = 120.0, request_id: str = ""):
        metadata = self.client.metadata + ((("request_id", request_id),) if request_id else ())
        return self._call(self.client.stub.Generate, request, metadata=metadata, timeout=timeout)

    def stream(self, request, timeout: float = 120.0):
        call = self.client.stub.GenerateStream(request, metadata=self.client.metadata, timeout=timeout)
        return self._events(iter(call)), call.cancel

    def start(self, request) -> Pending:
        import grpc

        future = self.client.stub.Generate.future(request, metadata=self.client.metadata, timeout=120)

        def result():
            try:
                return self._call(future.result)
            except grpc.FutureCancelledError:
                raise Failed("CANCELLED", "cancelled by this client") from None
        return Pending(result, future.cancel)

    def garbage(self):
        """A Generate call whose request bytes do not decode."""
        call = self.client.channel.unary_unary("/cones2.v1.Cones2Service/Generate")
        return self._call(call, b"\xff\xff\xff\x01", metadata=self.client.metadata, timeout=120)

    def health(self) -> str:
        import grpc

        try:
            return self.client.health(timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name


class HttpTransport(_Transport):
    name = "http"

    def __init__(self, base: str, token: str | None = None):
        from cones2.serve.client import HttpClient

        self.client = HttpClient(base, token=token, timeout=120)

    def close(self) -> None:
        pass

    def _call(self, fn, *a, **kw):
        from cones2.serve.client import HttpError

        try:
            return fn(*a, **kw)
        except HttpError as exc:
            raise Failed(exc.code, exc.message, exc.status, exc.retry_after) from None

    def generate(self, request, timeout: float = 120.0, request_id: str = ""):
        return self._call(self.client.generate_request, request, timeout=timeout, request_id=request_id)

    def stream(self, request, timeout: float = 120.0):
        import uuid

        rid = uuid.uuid4().hex
        it = self._call(self.client.generate_stream_request, request, request_id=rid, timeout=timeout)
        return self._events(it), lambda: self._call(self.client.cancel, rid)

    def start(self, request) -> Pending:
        import uuid

        rid = uuid.uuid4().hex
        return Pending(lambda: self._call(self.client.generate_request, request, request_id=rid),
                       lambda: self._call(self.client.cancel, rid))

    def garbage(self):
        """A Generate call whose body is not JSON."""
        return self._call(self.client.call, "POST", "/v1/generate", b"{not json")

    def health(self) -> str:
        return self.client.health()


def transport(kind: str, server, token: str | None = None):
    """A client of `server` (cones2.serve.server.Server) over `kind` ("grpc" or "http")."""
    if kind == "grpc":
        return GrpcTransport(server.address, token)
    return HttpTransport(f"http://127.0.0.1:{server.http_port}", token)
