"""The two Ray Serve deployments: `Cones2Engine` (one engine per replica) and `Cones2Ingress`.

    Ray Serve gRPC proxy  ->  Cones2Ingress (async, no model)  ->  Cones2Engine replicas (one per GPU)
    (cones2.v1.Cones2Service)    methods named like the RPCs        validate, @serve.batch, Engine

The ingress has the RPC-named methods the proxy calls (`Generate`, `GenerateStream`, ...; plus the
standard `grpc.health.v1.Health/Check`). It forwards each call to an engine replica through a
`DeploymentHandle` and turns the replica's `Reply` into the gRPC answer, setting the status code on
the call's `grpc_context`. It exists for one reason: when a replica dies with requests in flight,
Ray's proxy would answer INTERNAL; the ingress sees the `RayActorError` and answers UNAVAILABLE,
which clients retry (nothing ran to completion, so a retry is never a duplicate).

Each engine replica validates requests exactly like the in-process server (`validation.validate`,
then `Engine.check`), maps errors with the same `service.status_of` (Cones2Error ->
INVALID_ARGUMENT, ...), and runs compatible requests together through Ray Serve's `@serve.batch`
and `Engine.generate_batch` (one sampling loop at a time per replica). Residuals live in a
`ResidualStore` on a folder every node mounts, so an id registered through one replica resolves on
every other one.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from ... import Cones2Error, Engine, GenerationCancelled, __version__
from ...threads import configure_threads
from .. import cones2_pb2 as pb
from ..preview import latent_preview_png
from ..handlers import Undecodable, add_service
from ..residual_store import ResidualStore
from ..service import NotFound, generate_response, residual_info_pb, status_of
from ..validation import Limits, ValidatedRequest, validate

log = logging.getLogger(__name__)

REPLICA_METADATA = "cones2-replica"   # trailing metadata: which engine replica answered
RETRY_HINT = "retry the request"
SERVICE = pb.DESCRIPTOR.services_by_name["Cones2Service"]
SERVICE_NAME = SERVICE.full_name


def add_Cones2ServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated stubs' name)
    """What Ray Serve's gRPC proxy loads (`grpc_servicer_functions`): the generated
    `cones2_pb2_grpc.add_Cones2ServiceServicer_to_server`, registered from the same service descriptor
    by `cones2.serve.handlers.add_service`, whose request decoder never raises: a request whose bytes
    do not parse reaches the ingress as `Undecodable` and is answered INVALID_ARGUMENT, as by the
    in-process server (gRPC's own decoder would answer UNKNOWN)."""
    add_service(server, servicer, SERVICE)


@dataclass(frozen=True)
class EngineSpec:
    """How each replica builds its engine (`Engine.from_pretrained` arguments) and its torch threads.

    model: checkpoint folder or hub id as seen from the replica's node (None: the embedded model).
    device: "cpu" or "cuda" (a GPU replica sees only its own GPU, as cuda:0)."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    backend: str | None = None
    backend_options: dict = field(default_factory=dict)
    compile: bool = False
    threads: int | None = None
    warmup: bool = True
    warmup_resolutions: tuple = ()        # (height, width) pairs `Engine.warmup` compiles before serving
    warmup_batch_sizes: tuple = ()        # default: 1..max_batch


@dataclass
class Reply:
    """An engine replica's answer: a proto message, or a status code name and details."""

    message: object = None
    code: str = "OK"
    details: str = ""
    replica: str = ""


class _Job:
    """One validated request waiting in, or running through, a `@serve.batch` call."""

    __slots__ = ("request", "output_format", "preview_every", "events", "loop", "submitted", "started",
                 "batch_size", "cancelled")

    def __init__(self, v: ValidatedRequest, events: asyncio.Queue | None = None):
        self.request, self.output_format, self.preview_every = v.request, v.output_format, v.preview_every
        self.events = events
        self.loop = asyncio.get_running_loop()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.batch_size = 0
        self.cancelled = False

    def progress(self, step: int, total: int, preview: bytes | None) -> None:
        """Called on the sampling thread; the event reaches the stream on the replica's event loop."""
        if self.events is not None and not self.cancelled:
            event = pb.GenerateEvent(progress=pb.Progress(step=step, total_steps=total, preview_png=preview or b""))
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


_DONE = object()


class Cones2Engine:
    """One engine replica. Ray Serve constructs it in the replica's actor (GPU replicas get one GPU)."""

    def __init__(self, spec: EngineSpec, store_root: str, limits: Limits, max_batch: int, batch_wait_s: float,
                 max_queue: int):
        configure_threads(spec.threads)
        dtype = spec.dtype or ("fp16" if spec.device.startswith("cuda") else "fp32")
        self.engine = Engine.from_pretrained(spec.model, device=spec.device, dtype=dtype, backend=spec.backend,
                                             backend_options=dict(spec.backend_options), compile=spec.compile)
        if spec.warmup_resolutions:   # Ray Serve routes nothing here before __init__ returns
            self.engine.warmup(list(spec.warmup_resolutions), list(spec.warmup_batch_sizes or range(1, max_batch + 1)))
        elif spec.warmup:             # like the in-process worker: one tiny generation first
            self.engine.generate_batch([self.engine.request("warm up", height=64, width=64, steps=1)], progress=False)
        self.store = ResidualStore(store_root, self.engine.text_dim, max_bytes=limits.max_residual_bytes)
        self.limits, self.max_batch, self.max_queue = limits, max_batch, max_queue
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(batch_wait_s)
        # Sampling runs off the event loop, one loop at a time: the replica owns one device.
        self._sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cones2-sampler")
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 (constructed outside Ray Serve, e.g. in a unit test)
            self.replica_id = "local"
        log.info("replica %s ready: %s on %s (%s), max batch %d", self.replica_id, self.engine.components.model_id,
                 self.engine.device, self.engine.default_backend, max_batch)

    # ---- called by the ingress through a DeploymentHandle ------------------------------------
    async def generate(self, msg: pb.GenerateRequest) -> Reply:
        try:
            v = await asyncio.to_thread(validate, msg, self.engine, self.store, self.limits)
            job = _Job(v)
            gen = await self._submit(job)
            return self._reply(generate_response(gen, job.output_format, batch_size=job.batch_size,
                                                 queue_seconds=(job.started or job.submitted) - job.submitted))
        except Exception as exc:  # noqa: BLE001 (mapped to a status, like the in-process server)
            return self._error(exc)

    async def generate_stream(self, msg: pb.GenerateRequest):
        """Progress events as they happen, then the result (each a Reply carrying a GenerateEvent)."""
        try:
            v = await asyncio.to_thread(validate, msg, self.engine, self.store, self.limits)
        except Exception as exc:  # noqa: BLE001
            yield self._error(exc)
            return
        job = _Job(v, events=asyncio.Queue())
        task = asyncio.ensure_future(self._submit(job))
        task.add_done_callback(lambda _: job.events.put_nowait(_DONE))
        try:
            while (event := await job.events.get()) is not _DONE:
                yield self._reply(event)
            gen = task.result()
            resp = generate_response(gen, job.output_format, batch_size=job.batch_size,
                                     queue_seconds=(job.started or job.submitted) - job.submitted)
            yield self._reply(pb.GenerateEvent(result=resp))
        except Exception as exc:  # noqa: BLE001
            yield self._error(exc)
        finally:   # the client left (CancelledError, or the generator closed): drop it from its batch
            if not task.done():
                job.cancelled = True
                task.cancel()

    async def register_residual(self, msg: pb.RegisterResidualRequest) -> Reply:
        try:
            info, created = await asyncio.to_thread(self.store.register, msg.safetensors, "safetensors")
            return self._reply(pb.RegisterResidualResponse(residual=residual_info_pb(info), created=created))
        except Exception as exc:  # noqa: BLE001
            return self._error(exc)

    async def list_residuals(self, msg: pb.ListResidualsRequest | None = None) -> Reply:
        try:
            infos = await asyncio.to_thread(self.store.list)
            return self._reply(pb.ListResidualsResponse(residuals=[residual_info_pb(i) for i in infos]))
        except Exception as exc:  # noqa: BLE001
            return self._error(exc)

    async def delete_residual(self, msg: pb.DeleteResidualRequest) -> Reply:
        try:
            if not await asyncio.to_thread(self.store.delete, msg.id, "id"):
                raise NotFound(f"id: no residual with id {msg.id}")
            return self._reply(pb.DeleteResidualResponse())
        except Exception as exc:  # noqa: BLE001
            return self._error(exc)

    async def server_info(self, msg: pb.GetServerInfoRequest | None = None) -> Reply:
        e, lim = self.engine, self.limits
        return self._reply(pb.ServerInfo(
            engine_version=__version__, model_id=e.components.model_id, backend=e.default_backend,
            device=str(e.device), text_dim=e.text_dim, default_resolution=e.default_resolution,
            max_resolution=lim.max_resolution, max_steps=lim.max_steps, max_subjects=lim.max_subjects,
            max_batch=self.max_batch, max_queue=self.max_queue, max_residual_bytes=lim.max_residual_bytes))

    # ---- batching -----------------------------------------------------------------------------
    async def _submit(self, job: _Job):
        try:
            outcome = await self._batch(job)
        except asyncio.CancelledError:
            job.cancelled = True   # a running batch drops it; one whose members all left stops early
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[_Job]) -> list:
        """Ray Serve hands over up to max_batch queued requests; those with the same batch key
        (size, steps, guidance steps, mode) share one `Engine.generate_batch` loop."""
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.request.batch_key(), []).append(job)
        loop = asyncio.get_running_loop()
        outcomes: dict[int, object] = {}
        for group in groups.values():
            results = await loop.run_in_executor(self._sampler, self._run_group, group)
            outcomes.update({id(j): r for j, r in zip(group, results)})
        return [outcomes[id(j)] for j in jobs]

    def _run_group(self, group: list[_Job]) -> list:
        """On the sampler thread: one sampling loop for `group`; a failed batch is retried one by one
        so only the failing request gets its error (the replica keeps serving)."""
        live = [j for j in group if not j.cancelled]
        results: dict[int, object] = {id(j): GenerationCancelled("cancelled by the client") for j in group}
        if not live:
            return [results[id(j)] for j in group]
        now = time.monotonic()
        for job in live:
            job.started, job.batch_size = now, len(live)

        def on_step(i: int, n: int, latents) -> None:
            for k, job in enumerate(live):
                every = job.preview_every
                if job.events is None:
                    continue
                preview = latent_preview_png(latents[k]) if every and ((i + 1) % every == 0 or i + 1 == n) else None
                job.progress(i + 1, n, preview)

        try:
            gens = self.engine.generate_batch([j.request for j in live], progress=False, on_step=on_step,
                                              should_stop=lambda: all(j.cancelled for j in live))
            results.update({id(j): g for j, g in zip(live, gens)})
        except GenerationCancelled as exc:
            results.update({id(j): exc for j in live})
        except Exception as exc:  # noqa: BLE001 (one bad batch must never take the replica down)
            if len(live) == 1:
                log.exception("replica %s: request failed", self.replica_id)
                results[id(live[0])] = exc
            else:
                log.warning("replica %s: a batch of %d failed (%s); running its requests one by one",
                            self.replica_id, len(live), exc)
                for job in live:
                    results[id(job)] = self._run_group([job])[0]
        return [results[id(j)] for j in group]

    # ---- replies ------------------------------------------------------------------------------
    def _reply(self, message) -> Reply:
        return Reply(message, replica=self.replica_id)

    def _error(self, exc: BaseException) -> Reply:
        code, details = status_of(exc)
        return Reply(None, code.name, details, self.replica_id)


class Cones2Ingress:
    """What Ray Serve's gRPC proxy calls: one method per RPC of cones2.v1.Cones2Service (and the
    health service's Check). No model here: it forwards to the engine replicas and sets the status.

    auth_token: if set, every Cones2Service call must carry `authorization: Bearer <token>`
    (compared in constant time); health checks stay open."""

    def __init__(self, engine, auth_token: str | None = None):
        self.engine = engine
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None

    # ---- cones2.v1.Cones2Service --------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        return await self._unary("generate", request, grpc_context, pb.GenerateResponse)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        if not self._allowed(grpc_context):
            _fail(grpc_context, grpc.StatusCode.UNAUTHENTICATED, _AUTH_MESSAGE)
        if isinstance(request, Undecodable):
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, _undecodable(request))
        replica = ""
        try:
            async for reply in self.engine.options(stream=True).generate_stream.remote(request):
                replica = reply.replica
                if reply.code != "OK":
                    _fail(grpc_context, grpc.StatusCode[reply.code], reply.details, replica)
                _set_replica(grpc_context, replica)
                yield reply.message
        except _Failed:
            raise
        except Exception as exc:  # noqa: BLE001 (the replica died, or Ray refused the call)
            code, details = _ray_status(exc)
            _fail(grpc_context, code, details, replica)

    async def RegisterResidual(self, request: pb.RegisterResidualRequest, grpc_context=None):
        return await self._unary("register_residual", request, grpc_context, pb.RegisterResidualResponse)

    async def ListResiduals(self, request: pb.ListResidualsRequest, grpc_context=None):
        return await self._unary("list_residuals", request, grpc_context, pb.ListResidualsResponse)

    async def DeleteResidual(self, request: pb.DeleteResidualRequest, grpc_context=None):
        return await self._unary("delete_residual", request, grpc_context, pb.DeleteResidualResponse)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, grpc_context=None):
        return await self._unary("server_info", request, grpc_context, pb.ServerInfo)

    # ---- grpc.health.v1.Health ----------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """SERVING when an engine replica answers within 5 s (for "" and "cones2.v1.Cones2Service")."""
        if request.service not in ("", SERVICE_NAME):
            return _answer(grpc_context, Reply(None, "NOT_FOUND", f"unknown service {request.service!r}"),
                           health_pb2.HealthCheckResponse)
        try:
            reply = await asyncio.wait_for(self.engine.server_info.remote(), 5.0)
            serving = reply.code == "OK"
        except Exception:  # noqa: BLE001 (no replica answered: not serving)
            serving = False
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # ---- internals ----------------------------------------------------------------------------
    def _allowed(self, grpc_context) -> bool:
        if self._expected is None:
            return True
        given = b""
        for key, value in (grpc_context.invocation_metadata() if grpc_context is not None else ()):
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        return hmac.compare_digest(given, self._expected)

    async def _unary(self, method: str, request, grpc_context, empty):
        if not self._allowed(grpc_context):
            return _answer(grpc_context, Reply(None, "UNAUTHENTICATED", _AUTH_MESSAGE), empty)
        return _answer(grpc_context, await self._call(method, request), empty)

    async def _call(self, method: str, request) -> Reply:
        if isinstance(request, Undecodable):
            return Reply(None, "INVALID_ARGUMENT", _undecodable(request))
        try:
            return await getattr(self.engine, method).remote(request)
        except Exception as exc:  # noqa: BLE001 (the replica died, or Ray refused the call)
            code, details = _ray_status(exc)
            return Reply(None, code.name, details)

    # ---- HTTP (Ray Serve's HTTP proxy): the unary RPCs as JSON ---------------------------------
    async def __call__(self, request):
        """POST /cones2.v1.Cones2Service/<Method> with the request message as proto3 JSON (bytes
        fields base64) answers the response message as JSON; errors answer
        {"code": "INVALID_ARGUMENT", "message": ...} with the matching HTTP status."""
        from google.protobuf import json_format
        from starlette.responses import JSONResponse, Response

        method = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        target = _HTTP_METHODS.get(method)
        if request.method != "POST" or target is None or not request.url.path.rstrip("/").endswith(
                f"/{SERVICE_NAME}/{method}"):
            return JSONResponse({"code": "NOT_FOUND", "message": f"POST /{SERVICE_NAME}/<Method>, Method one of "
                                 f"{', '.join(_HTTP_METHODS)} (GenerateStream: use gRPC)"}, 404)
        if self._expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                return JSONResponse({"code": "UNAUTHENTICATED", "message": _AUTH_MESSAGE}, 401)
        engine_method, message_class = target
        try:
            body = await request.body()
            msg = json_format.Parse(body or b"{}", message_class())
        except Exception as exc:  # noqa: BLE001 (json_format.ParseError, UnicodeDecodeError, ...)
            return JSONResponse({"code": "INVALID_ARGUMENT", "message": f"request: {str(exc)[:200]}"}, 400)
        reply = await self._call(engine_method, msg)
        if reply.code != "OK":
            return JSONResponse({"code": reply.code, "message": reply.details}, _HTTP_STATUS.get(reply.code, 500),
                                headers={REPLICA_METADATA: reply.replica} if reply.replica else None)
        return Response(json_format.MessageToJson(reply.message), media_type="application/json",
                        headers={REPLICA_METADATA: reply.replica})


_HTTP_METHODS = {"Generate": ("generate", pb.GenerateRequest),
                 "RegisterResidual": ("register_residual", pb.RegisterResidualRequest),
                 "ListResiduals": ("list_residuals", pb.ListResidualsRequest),
                 "DeleteResidual": ("delete_residual", pb.DeleteResidualRequest),
                 "GetServerInfo": ("server_info", pb.GetServerInfoRequest)}
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
                "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_AUTH_MESSAGE = "missing or wrong bearer token (metadata 'authorization')"


class _Failed(Exception):
    """Ends a streaming RPC with the status already set on its grpc_context."""


def _undecodable(request: Undecodable) -> str:
    return f"request: not a valid {request.type_name} message"


def _fail(grpc_context, code: grpc.StatusCode, details: str, replica: str = ""):
    # A streaming method ends with an exception: Ray Serve keeps the code set on grpc_context.
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
        _set_replica(grpc_context, replica)
    raise _Failed(details)


def _answer(grpc_context, reply: Reply, empty):
    """The proto to return; on an error an empty message, with the status set on grpc_context (Ray
    Serve's proxy then answers that status, not OK)."""
    if grpc_context is not None:
        _set_replica(grpc_context, reply.replica)
        if reply.code != "OK":
            grpc_context.set_code(grpc.StatusCode[reply.code])
            grpc_context.set_details(reply.details)
    if reply.code != "OK":
        if grpc_context is None:
            raise Cones2Error(reply.details, reply.code)
        return empty()
    return reply.message


def _set_replica(grpc_context, replica: str) -> None:
    if grpc_context is not None and replica:
        grpc_context.set_trailing_metadata([(REPLICA_METADATA, replica)])


def _ray_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Ray's failures as retryable statuses: a dead or vanished replica (the request did not finish
    anywhere) -> UNAVAILABLE; Ray's own queue bound -> RESOURCE_EXHAUSTED; anything else INTERNAL."""
    if isinstance(exc, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        log.warning("an engine replica failed while answering (%s); answered UNAVAILABLE", type(exc).__name__)
        return (grpc.StatusCode.UNAVAILABLE,
                f"an engine replica stopped while answering ({type(exc).__name__}); {RETRY_HINT}")
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"every engine replica's queue is full; {RETRY_HINT} later"
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the Ray Serve logs"
