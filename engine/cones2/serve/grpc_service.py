"""The gRPC adapter: Cones2Service's RPCs on a `Core` (gRPC decoded the request; errors leave through
`core.status_of` as `context.abort`). Served by `cones2.serve.server.Server`."""
from __future__ import annotations

import time

import grpc

from . import cones2_pb2 as pb
from . import cones2_pb2_grpc as pb_grpc
from .core import DONE, UNARY, Core, status_of


class Cones2Servicer(pb_grpc.Cones2ServiceServicer):
    """The gRPC face of a `Core`: decode nothing (gRPC did), call the core, map errors to statuses."""

    def __init__(self, core: Core):
        self.core = core

    def Generate(self, request, context):
        with self.core.call("Generate") as call:
            try:
                return self._submit(request, context, stream=False).response()
            except Exception as exc:  # noqa: BLE001 (mapped to a status; the server keeps running)
                _abort(context, call, exc)

    def GenerateStream(self, request, context):
        with self.core.call("GenerateStream") as call:
            try:
                job = self._submit(request, context, stream=True)
                while (event := job.events.get()) is not DONE:
                    yield pb.GenerateEvent(progress=pb.Progress(step=event.step, total_steps=event.total,
                                                                preview_png=event.preview_png or b""))
                yield pb.GenerateEvent(result=job.response())
            except Exception as exc:  # noqa: BLE001
                _abort(context, call, exc)

    def _submit(self, request, context, stream: bool):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        job = self.core.submit(request, deadline=deadline, stream=stream)

        def on_rpc_end():   # the client cancelled, its deadline passed, or the answer went out
            left = context.time_remaining()
            job.cancel(deadline_passed=left is not None and left <= 0.05)

        if not context.add_callback(on_rpc_end):
            job.cancel()
        return job


def _unary(method: str):
    def handler(self, request, context):
        with self.core.call(method) as call:
            try:
                return getattr(self.core, UNARY[method])(request)
            except Exception as exc:  # noqa: BLE001
                _abort(context, call, exc)
    handler.__name__ = method
    return handler


for _method in UNARY:
    setattr(Cones2Servicer, _method, _unary(_method))


def _abort(context, call, exc: Exception) -> None:
    call.code, message = status_of(exc)
    context.abort(grpc.StatusCode[call.code], message)
