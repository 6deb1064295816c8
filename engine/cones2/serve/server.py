"""The in-process server: `cones2.v1.Cones2Service` over gRPC (health, reflection, auth, TLS,
metrics), and over HTTP/JSON next to it when `http_port` is set, both on one `Core`.

    server = Server(lambda: Engine.from_pretrained(path), ServeOptions(port=50051)).start()
    server.wait_ready()            # health turns SERVING once every worker's engine is warm
    server.stop()                  # NOT_SERVING, finish in-flight work (bounded grace), close the ports
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from .. import Cones2Error, Engine
from . import cones2_pb2 as pb
from .auth import BearerTokenInterceptor, Token
from .core import Core, CoreOptions
from .grpc_service import Cones2Servicer
from .handlers import add_service

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Cones2Service"]
SERVICE_NAME = SERVICE.full_name   # "cones2.v1.Cones2Service"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
DEFAULT_MAX_MESSAGE_BYTES = 32 << 20


@dataclass(frozen=True)
class ServeOptions(CoreOptions):
    """How to run the server (the `cones2-engine serve` flags): `CoreOptions` plus the transports.

    tls_cert/tls_key: PEM bytes (both or neither). auth_token: required bearer token, or None.
    http_port / metrics_port: serve HTTP/JSON / Prometheus metrics on host:port (None = off, 0 = any
    free port). grace_seconds: how long `stop` lets in-flight requests finish (NOT_SERVING meanwhile).
    max_message_bytes: the largest request either transport accepts.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    auth_token: str | None = None
    metrics_port: int | None = None
    grace_seconds: float = 30.0

    def __post_init__(self):
        super().__post_init__()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise Cones2Error("give both tls_cert and tls_key, or neither", "tls_cert")

    def core(self) -> CoreOptions:
        return CoreOptions(**{f.name: getattr(self, f.name) for f in fields(CoreOptions)})


class Server:
    """A running Cones2Service. `engine_factory()` is called once per worker, in that worker's thread."""

    def __init__(self, engine_factory: Callable[[], Engine], options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.core = Core(engine_factory, self.options.core())
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None
        self._stopped = False
        self._grpc: grpc.Server | None = None

    # the core's parts, for tests and the CLI
    jobs = property(lambda self: self.core.jobs)
    workers = property(lambda self: self.core.workers)
    engine = property(lambda self: self.core.engine)
    store = property(lambda self: self.core.store)
    metrics = property(lambda self: self.core.metrics)
    http_port = property(lambda self: self.http.port if self.http is not None else None)

    def start(self) -> "Server":
        """Bind the ports, start the workers (they load and warm up the model); returns at once."""
        o = self.options
        threads = o.max_queue + o.workers * o.max_batch + 16
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cones2-rpc")
        token = Token(o.auth_token)
        reject = lambda m: self.metrics.observe(m.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)  # noqa: E731
        interceptors = [BearerTokenInterceptor(token, on_reject=reject)] if token.required else []
        self._grpc = grpc.server(self._executor, interceptors=interceptors, maximum_concurrent_rpcs=threads, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0)])        # a second server on the same port must fail, not share it
        add_service(self._grpc, Cones2Servicer(self.core), SERVICE,
                    on_reject=lambda m: self.metrics.observe(m, "INVALID_ARGUMENT", 0.0))
        add_service(self._grpc, self.health, HEALTH)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH.full_name, reflection.SERVICE_NAME), self._grpc)
        address = f"[{o.host}]:{o.port}" if ":" in o.host else f"{o.host}:{o.port}"
        reason = "in use?"
        try:
            creds = grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)]) if o.tls_cert is not None else None
            self.port = self._grpc.add_secure_port(address, creds) if creds else self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            self.port, reason = 0, str(exc)
        if not self.port:
            self._executor.shutdown(wait=False)
            raise Cones2Error(f"cannot listen on {address} ({reason})", "port")
        try:
            if o.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(o.metrics_port, o.host)
            if o.http_port is not None:
                from .http_json import HttpServer

                self.http = HttpServer(self.core, token, o.host, o.http_port, o.max_message_bytes).start()
        except (OSError, Cones2Error) as exc:
            self.metrics.close()
            self._executor.shutdown(wait=False)
            raise exc if isinstance(exc, Cones2Error) else Cones2Error(
                f"cannot serve metrics on {o.host}:{o.metrics_port} ({exc})", "metrics_port") from None
        self._grpc.start()
        self.core.start(on_ready=lambda: self._set_health(health_pb2.HealthCheckResponse.SERVING),
                        on_dead=lambda: self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        log.info("listening on %s:%d (%s); loading the model", o.host, self.port, "TLS" if o.tls_cert else "plaintext")
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once SERVING; False on timeout; re-raises the error if loading the model failed."""
        return self.core.wait_ready(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Drain, then close: health turns NOT_SERVING and new calls get UNAVAILABLE while in-flight
        requests get up to `grace` seconds to finish with the ports still open (so probes see
        NOT_SERVING, not a closed port); then the ports close and whatever is left is cancelled."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.grace_seconds if grace is None else grace
        end = time.monotonic() + grace
        self.core.stop_accepting()
        self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            if grace > 0:
                log.info("draining: health NOT_SERVING, waiting up to %gs for requests in flight", grace)
                self.core.wait_idle(grace)
            left = max(0.0, end - time.monotonic())
            self._grpc.stop(left).wait(left + 5)
        if self.http is not None:
            self.http.close()
        self.core.close()
        self.metrics.close()
        if self._grpc is not None:
            self._executor.shutdown(wait=False)
        log.info("stopped")

    def check_available(self) -> None:
        self.core.check_available()

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    def __enter__(self) -> "Server":
        return self if self._grpc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)

    def _set_health(self, status) -> None:
        if status != health_pb2.HealthCheckResponse.SERVING or not self._stopped:
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)
