"""The Cones2Service handlers: validate, enqueue, wait, answer; and the one exception -> status mapping.

RPC threads do no model work: they validate the request (validation.py), put a Job on the queue and
wait for a worker (worker.py) to finish it. Every error leaves through `_status`: Cones2Error ->
INVALID_ARGUMENT, full queue -> RESOURCE_EXHAUSTED, not ready / stopping -> UNAVAILABLE, and anything
unexpected -> INTERNAL with the trace in the server log, never in the reply. Replies are cut to
MAX_DETAIL_CHARS, so no message can outgrow gRPC's trailer limit.
"""
from __future__ import annotations

import functools
import logging
import threading
import time

import grpc

from .. import Cones2Error, Generation, GenerationCancelled, __version__
from . import cones2_pb2 as pb
from . import cones2_pb2_grpc as pb_grpc
from .residual_store import ResidualInfo, StoreFull
from .validation import ValidatedRequest, validate
from .worker import DONE, DeadlineExceeded, Job, QueueFull, ShuttingDown

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 300


class NotReady(Exception):
    """The model is still loading or warming up."""


class NotFound(Exception):
    """No such residual."""


class InFlight:
    """Counts the RPCs being answered, so a draining server can wait for them with its port open."""

    def __init__(self):
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc) -> None:
        with self._idle:
            self._count -= 1
            if not self._count:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._count, timeout)


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place exceptions become gRPC status codes and short replies."""
    code, message = _classify(exc)
    if len(message) > MAX_DETAIL_CHARS:
        message = f"{message[:MAX_DETAIL_CHARS - 25]}... ({len(message)} chars)"
    return code, message


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Cones2Error):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (QueueFull, StoreFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (NotReady, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, GenerationCancelled):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _rpc(fn):
    """Error mapping (`_status`, then `context.abort`), metrics and the in-flight count around a handler."""
    method = fn.__name__

    if method == "GenerateStream":
        @functools.wraps(fn)
        def stream(self, request, context):
            start, code = time.monotonic(), grpc.StatusCode.OK
            with self.server.inflight:
                try:
                    yield from fn(self, request, context)
                except GeneratorExit:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:  # noqa: BLE001 (mapped to a status; the server keeps running)
                    code, message = _status(exc)
                    context.abort(code, message)
                finally:
                    self.server.metrics.observe(method, code.name, time.monotonic() - start)
        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        start, code = time.monotonic(), grpc.StatusCode.OK
        with self.server.inflight:
            try:
                return fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 (mapped to a status; the server keeps running)
                code, message = _status(exc)
                context.abort(code, message)
            finally:
                self.server.metrics.observe(method, code.name, time.monotonic() - start)
    return unary


class Cones2Servicer(pb_grpc.Cones2ServiceServicer):
    """The service; `server` is the running `cones2.serve.server.Server` (engine, store, queue, limits)."""

    def __init__(self, server):
        self.server = server

    # ---- generation ---------------------------------------------------------------------------
    @_rpc
    def Generate(self, request, context):
        job, v = self._submit(request, context, want_events=False)
        return self._response(job, v, self._outcome(job))

    @_rpc
    def GenerateStream(self, request, context):
        job, v = self._submit(request, context, want_events=True)
        while True:
            event = job.events.get()
            if event is DONE:
                break
            yield pb.GenerateEvent(progress=pb.Progress(step=event.step, total_steps=event.total,
                                                        preview_png=event.preview_png or b""))
        yield pb.GenerateEvent(result=self._response(job, v, self._outcome(job)))

    def _submit(self, request: pb.GenerateRequest, context, want_events: bool) -> tuple[Job, ValidatedRequest]:
        s = self.server
        s.check_available()
        v = validate(request, s.engine, s.store, s.options.limits)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        job = Job(v.request, deadline=deadline, want_events=want_events, preview_every=v.preview_every)
        s.jobs.put(job)

        def on_rpc_end():
            left = context.time_remaining()
            job.cancel(deadline_passed=left is not None and left <= 0.05)

        if not context.add_callback(on_rpc_end):
            job.cancel()
        return job, v

    @staticmethod
    def _outcome(job: Job) -> Generation:
        outcome = job.wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _response(self, job: Job, v: ValidatedRequest, gen: Generation) -> pb.GenerateResponse:
        return generate_response(gen, v.output_format, batch_size=job.batch_size,
                                 queue_seconds=(job.started or job.submitted) - job.submitted)

    # ---- residuals ----------------------------------------------------------------------------
    @_rpc
    def RegisterResidual(self, request, context):
        self.server.check_available()
        info, created = self.server.store.register(request.safetensors, "safetensors")
        return pb.RegisterResidualResponse(residual=_info_pb(info), created=created)

    @_rpc
    def ListResiduals(self, request, context):
        self.server.check_available()
        return pb.ListResidualsResponse(residuals=[_info_pb(i) for i in self.server.store.list()])

    @_rpc
    def DeleteResidual(self, request, context):
        self.server.check_available()
        if not self.server.store.delete(request.id, "id"):
            raise NotFound(f"id: no residual with id {request.id}")
        return pb.DeleteResidualResponse()

    @_rpc
    def GetServerInfo(self, request, context):
        s = self.server
        s.check_available()
        e, o = s.engine, s.options
        return pb.ServerInfo(engine_version=__version__, model_id=e.components.model_id, backend=e.default_backend,
                             device=str(e.device), text_dim=e.text_dim, default_resolution=e.default_resolution,
                             max_resolution=o.limits.max_resolution, max_steps=o.limits.max_steps,
                             max_subjects=o.limits.max_subjects, max_batch=o.max_batch, max_queue=o.max_queue,
                             max_residual_bytes=o.limits.max_residual_bytes)


def generate_response(gen: Generation, output_format: str, *, batch_size: int,
                      queue_seconds: float) -> pb.GenerateResponse:
    """Generation -> GenerateResponse: the PNG, or the latents as safetensors (output_format "latents").
    Shared by this servicer and the Ray Serve deployment (cones2.serve.ray)."""
    timings = dict(gen.timings)
    timings["queue"] = queue_seconds
    resp = pb.GenerateResponse(seed=gen.seed, timings=timings, engine_version=__version__,
                               model_id=gen.model_id, backend=gen.backend,
                               batch_size=batch_size, width=gen.image.width, height=gen.image.height)
    if output_format == "latents":
        from safetensors.torch import save

        params = gen.parameters()
        resp.latents = save({"latents": gen.latents.contiguous(), "cond_embeddings": gen.cond_embeddings.contiguous()},
                            metadata={k: str(val) for k, val in params.items()})
    else:
        resp.image = gen.png()
    return resp


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and short reply for an exception (the in-process server's mapping), for
    other front ends of the same service (cones2.serve.ray)."""
    return _status(exc)


def residual_info_pb(info: ResidualInfo) -> pb.ResidualInfo:
    return _info_pb(info)


def _info_pb(info: ResidualInfo) -> pb.ResidualInfo:
    return pb.ResidualInfo(id=info.id, word=info.word, rows=info.rows, dim=info.dim, base_model=info.base_model,
                           size_bytes=info.size_bytes, metadata=info.metadata)
