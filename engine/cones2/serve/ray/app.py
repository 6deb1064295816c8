"""Building and running the Ray Serve application: options, `build_app`, `RayService`.

    service = RayService(RayServeOptions(replicas=2, grpc_port=50051), EngineSpec()).start()
    ...                                   # clients: cones2.serve.client.Client("127.0.0.1:50051")
    service.stop()

`RayService.start()` connects to Ray (`address`: None starts a local instance, "auto" joins the
cluster this node belongs to), starts Serve with its gRPC proxy serving `cones2.v1.Cones2Service`
(and `grpc.health.v1.Health`), deploys the application and waits until it runs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from ... import Cones2Error, Engine, cache_root, default_dtype
from ..core import CoreOptions
from ..validation import Limits
from .deployment import Cones2Engine
from .ingress import Cones2Ingress

log = logging.getLogger(__name__)

APP_NAME = "cones2"
ENGINE_DEPLOYMENT = "Cones2Engine"
INGRESS_DEPLOYMENT = "Cones2Ingress"
# Import paths Ray Serve's gRPC proxy loads: cones2.v1.Cones2Service and grpc.health.v1.Health, both
# with a decoder that never raises (deployment.add_Cones2ServiceServicer_to_server).
GRPC_SERVICER_FUNCTIONS = [
    "cones2.serve.ray.deployment.add_Cones2ServiceServicer_to_server",
    "cones2.serve.ray.deployment.add_HealthServicer_to_server",
]
# Environment the replicas need to resolve the model the way this process does (the embedded
# default, a test's tiny model, the cache folder), whatever environment the Ray workers started in.
FORWARDED_ENV_PREFIXES = ("CONES2_", "TRITON_INTERPRET", "HF_HOME", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class EngineSpec:
    """How each replica builds its engine (`Engine.from_pretrained` arguments), its torch threads and
    warm-up shapes. model: as seen from the replica's node (None: the embedded model); device "cpu"
    or "cuda" (a GPU replica sees only its own GPU, as cuda:0)."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    backend: str | None = None
    backend_options: dict = field(default_factory=dict)
    compile: bool = False
    threads: int | None = None
    warmup_resolutions: tuple = ()
    warmup_batch_sizes: tuple = ()

    def build(self) -> Engine:
        dtype = self.dtype or default_dtype(self.device)
        return Engine.from_pretrained(self.model, device=self.device, dtype=dtype, backend=self.backend,
                                      backend_options=dict(self.backend_options), compile=self.compile)



@dataclass(frozen=True)
class RayServeOptions:
    """How to run the deployment (the `cones2-engine serve --ray` flags).

    replicas: engine replicas (fixed), or the initial count when min/max_replicas are given
    (autoscaling on ongoing requests per replica, target `max_batch`). GPU engines (EngineSpec.device
    "cuda") get one GPU per replica; CPU replicas reserve `replica_cpus` CPUs each.
    residual_store: a folder every node mounts (None: this machine's cache folder, single machine).
    max_batch / max_queue: each replica's `Core` (batch size; requests waiting in its queue, then
    RESOURCE_EXHAUSTED; Ray's router holds at most max_queue per replica more). grpc_port: Ray
    Serve's gRPC proxy (it listens on every interface); http_port: its HTTP proxy (the HTTP/JSON API
    of cones2.serve.http_json), on `host`, None = off. address: None = start a local Ray with `num_cpus`
    CPUs (None: all); "auto" or "HOST:6379" = join that cluster. auth_token: bearer token every
    Cones2Service call must carry. max_message_bytes: the gRPC proxy's message limit (applied to a
    local Ray; on a cluster set RAY_SERVE_GRPC_MAX_MESSAGE_SIZE where `ray start` runs).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    residual_store: str | Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 4
    max_queue: int = 32
    grpc_port: int = 50051
    http_port: int | None = None
    host: str = "127.0.0.1"
    address: str | None = None
    num_cpus: int | None = None
    auth_token: str | None = None
    grace_seconds: float = 30.0
    max_message_bytes: int = 32 << 20

    def __post_init__(self):
        for name in ("replicas", "max_batch", "max_queue", "max_message_bytes"):
            if int(getattr(self, name)) < 1:
                raise Cones2Error(f"must be >= 1, got {getattr(self, name)}", name)
        if not self.replica_cpus >= 0:
            raise Cones2Error(f"must be >= 0, got {self.replica_cpus}", "replica_cpus")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is None) != (hi is None):
            raise Cones2Error("give both min_replicas and max_replicas for autoscaling, or neither", "min_replicas")
        if lo is not None and not 0 <= lo <= hi or hi is not None and hi < 1:
            raise Cones2Error(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {lo}..{hi}",
                              "min_replicas")
        if lo is not None and not lo <= self.replicas <= hi:
            raise Cones2Error(f"replicas ({self.replicas}) must lie within min_replicas..max_replicas ({lo}..{hi})",
                              "replicas")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


def store_root(options: RayServeOptions) -> str:
    """The residual folder the replicas share, as an absolute path."""
    root = options.residual_store if options.residual_store is not None else cache_root() / "residuals"
    return str(Path(root).expanduser().absolute())


def build_app(options: RayServeOptions, spec: EngineSpec):
    """The Ray Serve application: the ingress bound to the engine deployment."""
    gpu = spec.device.startswith("cuda")
    if gpu and spec.device not in ("cuda", "cuda:0"):
        raise Cones2Error("with --ray give --device cuda: each replica gets one GPU of its own (as cuda:0)", "device")
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    actor = {"num_cpus": options.replica_cpus, "num_gpus": 1 if gpu else 0}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    scale: dict = {"num_replicas": options.replicas}
    if options.autoscaling:
        scale = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": options.replicas, "target_ongoing_requests": options.max_batch}}
    engine = serve.deployment(Cones2Engine, name=ENGINE_DEPLOYMENT).options(
        ray_actor_options=actor,
        # The replica's Core holds a running batch plus max_queue waiting; Ray's router holds a bounded rest.
        max_ongoing_requests=options.max_queue + options.max_batch,
        max_queued_requests=options.max_queue * max(1, options.replicas),
        graceful_shutdown_timeout_s=options.grace_seconds, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5, **scale)
    ingress = serve.deployment(Cones2Ingress, name=INGRESS_DEPLOYMENT).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=options.grace_seconds, graceful_shutdown_wait_loop_s=0.5)
    core = CoreOptions(residual_store=store_root(options), max_queue=options.max_queue, max_batch=options.max_batch,
                       limits=options.limits, warmup_resolutions=spec.warmup_resolutions,
                       warmup_batch_sizes=spec.warmup_batch_sizes)
    return ingress.bind(engine.bind(spec, core), options.auth_token)


class RayService:
    """The deployment on a Ray cluster (a local one unless `options.address` is given)."""

    def __init__(self, options: RayServeOptions | None = None, spec: EngineSpec | None = None):
        self.options = options or RayServeOptions()
        self.spec = spec or EngineSpec()
        self.started_ray = False
        self.handle = None
        self._stopped = False

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    def start(self, timeout: float = 600.0) -> "RayService":
        """Connect to (or start) Ray, start Serve's proxies, deploy, wait until RUNNING."""
        o = self.options
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        app = build_app(o, self.spec)     # checks the options before anything starts
        if not ray.is_initialized():
            kw = {"namespace": "cones2", "include_dashboard": False, "log_to_driver": True}
            if o.address is None:
                # The local Ray's processes (Serve's proxy among them) inherit this environment.
                os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(o.max_message_bytes)
                kw |= {"num_cpus": o.num_cpus, "_node_ip_address": "127.0.0.1"}
            else:
                kw["address"] = o.address
            ray.init(**kw)
            self.started_ray = o.address is None
        http = {"host": o.host, "port": o.http_port} if o.http_port else {"location": "NoServer"}
        serve.start(http_options=http, grpc_options=gRPCOptions(port=o.grpc_port,
                                                                grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        start = time.monotonic()
        # Ray's proxies route only to applications with a route prefix (gRPC calls too).
        try:
            self.handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise _deploy_error(exc) from None
        log.info("deployed %s in %.1fs", APP_NAME, time.monotonic() - start)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain, then delete the application: the ingress answers health NOT_SERVING and new calls
        UNAVAILABLE while the calls in flight get up to `grace` seconds (default grace_seconds) to
        finish; then the application is deleted, and a Ray this service started shut down. Idempotent."""
        if self._stopped or not ray.is_initialized():
            return
        self._stopped = True
        grace = self.options.grace_seconds if grace is None else grace
        if self.handle is not None and grace > 0:
            try:
                left = self.handle.drain.remote(grace).result(timeout_s=grace + 60)
                log.info("drained%s", f"; {left} call(s) still running" if left else "")
            except Exception as exc:  # noqa: BLE001 (the ingress is gone: nothing to drain)
                log.warning("draining: %s", exc)
        try:
            serve.delete(APP_NAME, _blocking=True)
        except Exception as exc:  # noqa: BLE001 (never deployed, or already gone)
            log.warning("deleting the application: %s", exc)
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()

    def __enter__(self) -> "RayService":
        return self if self.handle is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _deploy_error(exc: RuntimeError) -> Exception:
    """Why deploying failed, from the replicas' own error (Serve's status keeps its trace): a
    `Cones2Error` raised in a replica (a missing model, a backend that cannot run there) comes back
    as that Cones2Error, naming its field; anything else as a one-line RuntimeError."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        messages = [d.message.strip() for d in deployments if d.message and d.message.strip()]
    except Exception:  # noqa: BLE001 (no status to read: report Ray's own error)
        messages = []
    last = messages[0].splitlines()[-1].strip() if messages else ""
    prefix = "cones2.errors.Cones2Error: "
    if last.startswith(prefix):
        field, sep, message = last[len(prefix):].partition(": ")
        return Cones2Error(message, field) if sep and " " not in field else Cones2Error(last[len(prefix):])
    return RuntimeError(f"the engine replicas failed to start: {last or exc} (the trace is in the Ray Serve logs)")
