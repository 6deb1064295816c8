"""The gRPC server: `cones2.v1.Cones2Service`, health, reflection, auth, TLS, metrics, shutdown.

    server = Server(lambda: Engine.from_pretrained(path), ServeOptions(port=50051)).start()
    server.wait_ready()            # health turns SERVING once every worker's engine is warm
    ...
    server.stop()                  # NOT_SERVING, finish in-flight work (bounded grace), close the port

The handlers (service.py) only validate, enqueue and wait; all model work happens on the worker
threads (worker.py), one engine each.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from .. import Cones2Error, Engine, cache_root
from . import cones2_pb2 as pb
from .auth import BearerTokenInterceptor
from .handlers import add_service
from .metrics import Metrics
from .residual_store import ResidualStore
from .service import Cones2Servicer, InFlight, NotReady
from .validation import Limits
from .worker import JobQueue, ShuttingDown, Worker

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Cones2Service"]
SERVICE_NAME = SERVICE.full_name   # "cones2.v1.Cones2Service"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
DEFAULT_MAX_MESSAGE_BYTES = 32 << 20


@dataclass(frozen=True)
class ServeOptions:
    """How to run the server (the `cones2-engine serve` flags).

    tls_cert/tls_key: PEM bytes (both or neither). auth_token: required bearer token, or None.
    metrics_port: serve Prometheus metrics over HTTP on host:port (None = off, 0 = any free port).
    grace_seconds: how long `stop` lets in-flight requests finish (health says NOT_SERVING meanwhile).
    warmup_resolutions (sides or (height, width)) / warmup_batch_sizes: shapes every worker compiles
    (`Engine.warmup`) while health says NOT_SERVING; see `Worker` for the defaults.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    residual_store: str | Path | None = None
    max_queue: int = 32
    max_batch: int = 4
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    auth_token: str | None = None
    metrics_port: int | None = None
    grace_seconds: float = 30.0
    warmup_resolutions: tuple = ()
    warmup_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "workers"):
            if int(getattr(self, name)) < 1:
                raise Cones2Error(f"must be >= 1, got {getattr(self, name)}", name)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise Cones2Error("give both tls_cert and tls_key, or neither", "tls_cert")


class Server:
    """A running Cones2Service. `engine_factory()` is called once per worker, in that worker's thread."""

    def __init__(self, engine_factory: Callable[[], Engine], options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        o = self.options
        self.engine_factory = engine_factory
        self.jobs = JobQueue(o.max_queue)
        self.metrics = Metrics(self.jobs.depth, lambda: self.jobs.stats.running, o.max_batch)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.workers = [Worker(f"cones2-worker-{i}", engine_factory, self.jobs, max_batch=o.max_batch,
                               on_batch=self.metrics.batch_size.observe, warmup_resolutions=o.warmup_resolutions,
                               warmup_batch_sizes=o.warmup_batch_sizes)
                        for i in range(o.workers)]
        self.engine: Engine | None = None
        self.inflight = InFlight()
        self.store: ResidualStore | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._accepting = True
        self._stopped = False
        self._grpc: grpc.Server | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Server":
        """Bind the port, start the workers (they load and warm up the model); returns at once."""
        o = self.options
        threads = o.max_queue + o.workers * o.max_batch + 16
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cones2-rpc")
        interceptors = []
        if o.auth_token:
            interceptors.append(BearerTokenInterceptor(
                o.auth_token, on_reject=lambda m: self.metrics.observe(_method_name(m), "UNAUTHENTICATED", 0.0)))
        self._grpc = grpc.server(self._executor, interceptors=interceptors, maximum_concurrent_rpcs=threads, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),        # a second server on the same port must fail, not share it
        ])
        undecodable = lambda m: self.metrics.observe(m, "INVALID_ARGUMENT", 0.0)  # noqa: E731
        add_service(self._grpc, Cones2Servicer(self), SERVICE, on_reject=undecodable)
        add_service(self._grpc, self.health, HEALTH)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH.full_name, reflection.SERVICE_NAME),
            self._grpc)
        address = f"[{o.host}]:{o.port}" if ":" in o.host else f"{o.host}:{o.port}"
        try:
            if o.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)])
                self.port = self._grpc.add_secure_port(address, creds)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            self.port = 0
            reason = str(exc)
        else:
            reason = "in use?"
        if not self.port:
            self._executor.shutdown(wait=False)
            raise Cones2Error(f"cannot listen on {address} ({reason})", "port")
        self._grpc.start()
        if o.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(o.metrics_port, o.host)
            except OSError as exc:
                self._grpc.stop(0)
                self._executor.shutdown(wait=False)
                raise Cones2Error(f"cannot serve metrics on {o.host}:{o.metrics_port} ({exc})", "metrics_port") from None
        for w in self.workers:
            w.start()
        threading.Thread(target=self._become_ready, name="cones2-ready", daemon=True).start()
        log.info("listening on %s:%d (%s); loading the model", o.host, self.port, "TLS" if o.tls_cert else "plaintext")
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once SERVING; False on timeout; re-raises the error if loading the model failed."""
        if not self._ready.wait(timeout):
            return False
        if self._load_error is not None:
            raise self._load_error
        return True

    def stop(self, grace: float | None = None) -> None:
        """Drain, then close: health turns NOT_SERVING and new calls get UNAVAILABLE while in-flight
        requests get up to `grace` seconds to finish with the port still open (so probes see
        NOT_SERVING, not a closed port); then the port closes and whatever is left is cancelled."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.grace_seconds if grace is None else grace
        end = time.monotonic() + grace
        self._accepting = False
        self.health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        if self._grpc is not None:
            if grace > 0:
                log.info("draining: health NOT_SERVING, waiting up to %gs for requests in flight", grace)
                self.inflight.wait_idle(grace)
            left = max(0.0, end - time.monotonic())
            self._grpc.stop(left).wait(left + 5)
        for job in self.jobs.close():
            job.cancel("the server stopped")
        for w in self.workers:
            w.abort()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=10)
        self.metrics.close()
        if self._grpc is not None:
            self._executor.shutdown(wait=False)
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    def __enter__(self) -> "Server":
        return self if self._grpc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)

    def _become_ready(self) -> None:
        for w in self.workers:
            w.ready.wait()
        try:
            failed = [w.error for w in self.workers if w.error is not None]
            if failed:
                raise failed[0]
            self.engine = self.workers[0].engine
            root = self.options.residual_store
            if root is None:
                root = cache_root() / "residuals"
            self.store = ResidualStore(root, self.engine.text_dim, max_bytes=self.options.limits.max_residual_bytes)
        except BaseException as exc:  # noqa: BLE001 (reported by wait_ready; health stays NOT_SERVING)
            self._load_error = exc
            self._ready.set()
            return
        if not self._stopped:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.ready.set(1)
            log.info("ready: %s on %s (%s), %d worker(s), max batch %d, queue %d", self.engine.components.model_id,
                     self.engine.device, self.engine.default_backend, len(self.workers), self.options.max_batch,
                     self.options.max_queue)
        self._ready.set()

    # ---- used by the servicer -----------------------------------------------------------------
    def check_available(self) -> None:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if not self._ready.is_set() or self._load_error is not None or self.store is None:
            raise NotReady("the model is loading or warming up; retry when health reports SERVING")


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]
