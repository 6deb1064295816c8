"""The Ray Serve adapter, ingress side: `Cones2Ingress`, what Ray Serve's gRPC and HTTP proxies call.

It checks the token (`auth.Token`), forwards each call to an engine replica (deployment.py) through
a deployment handle and sets the status: a replica that died with the request in flight becomes
UNAVAILABLE (retry: nothing finished), Ray's own queue bound RESOURCE_EXHAUSTED. At shutdown
`drain` turns health NOT_SERVING and new calls UNAVAILABLE while the calls in flight finish.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from .. import cones2_pb2 as pb
from ..auth import MESSAGE as AUTH_MESSAGE
from ..auth import Token
from ..core import ShuttingDown, status_of
from ..handlers import Undecodable
from .deployment import REPLICA_METADATA, SERVICE_NAME, Reply
from .http_entry import HttpEntry

log = logging.getLogger(__name__)
_SHUTTING_DOWN = status_of(ShuttingDown("the server is shutting down"))


class Cones2Ingress(HttpEntry):
    """What Ray Serve's proxies call: one method per RPC (plus health's Check, and HTTP's __call__
    from `HttpEntry`); forwards to an engine replica and sets the status. auth_token: as `auth.Token`."""

    def __init__(self, engine, auth_token: str | None = None):
        self.engine, self.token = engine, Token(auth_token)
        self._by_id: dict[str, object] = {}   # HTTP X-Request-Id -> the replica call answering it
        self._cancelled: set[str] = set()     # ids whose call was cancelled through the Cancel route
        self.draining, self._inflight = False, 0

    async def drain(self, grace: float) -> int:
        """Shutdown step 1 (`RayService.stop`): refuse new calls, wait up to `grace` seconds for the
        calls in flight; returns how many were still running."""
        self.draining, end = True, time.monotonic() + grace
        while self._inflight and time.monotonic() < end:
            await asyncio.sleep(0.1)
        return self._inflight

    async def GenerateStream(self, request, grpc_context=None):
        async for reply in self._stream(request, grpc_context is None or self.token.allows_metadata(
                grpc_context.invocation_metadata())):
            _set_status(grpc_context, reply)
            if reply.code != "OK":
                raise _Failed(reply.details)      # Ray Serve keeps the code set on grpc_context
            yield reply.message

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """SERVING when an engine replica answers within 5 s (for "" and "cones2.v1.Cones2Service")."""
        if isinstance(request, Undecodable) or request.service not in ("", SERVICE_NAME):
            _set_status(grpc_context, Reply(None, "INVALID_ARGUMENT", f"request: not a valid {request.type_name} "
                                            "message") if isinstance(request, Undecodable) else
                        Reply(None, "NOT_FOUND", f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        reply = await self._forward("GetServerInfo", pb.GetServerInfoRequest(), timeout=5.0)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if reply.code == "OK"
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _stream(self, request, allowed: bool, request_id: str = ""):
        if not allowed:
            yield Reply(None, "UNAUTHENTICATED", AUTH_MESSAGE)
        elif isinstance(request, Undecodable):
            yield Reply(None, "INVALID_ARGUMENT", f"request: not a valid {request.type_name} message")
        elif self.draining:
            yield Reply(None, *_SHUTTING_DOWN)
        else:
            call = self._hold(self.engine.options(stream=True).generate_stream.remote(request), request_id)
            try:
                async for reply in call:
                    yield reply
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 (a replica died, Ray refused)
                yield self._failure(exc, request_id)
            finally:
                self._release(request_id)

    async def _forward(self, method: str, request, timeout: float | None = None, request_id: str = "") -> Reply:
        if isinstance(request, Undecodable):
            return Reply(None, "INVALID_ARGUMENT", f"request: not a valid {request.type_name} message")
        if self.draining:        # health too: NOT_SERVING while draining
            return Reply(None, *_SHUTTING_DOWN)
        call = self._hold(self.engine.call.remote(method, request), request_id)
        try:
            return await asyncio.wait_for(call, timeout)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 (a replica died, Ray refused)
            return self._failure(exc, request_id)
        finally:
            self._release(request_id)

    def _hold(self, call, request_id: str):
        """Count `call` in flight (the drain waits for it); keep it under `request_id` for Cancel."""
        self._inflight += 1
        if request_id:
            self._by_id[request_id] = call
        return call

    def _failure(self, exc: BaseException, request_id: str) -> Reply:
        """CANCELLED when the Cancel route stopped the call; a CancelledError otherwise is this
        call's own (the client left): re-raised; the rest as `_ray_status`."""
        if request_id and request_id in self._cancelled:
            return Reply(None, "CANCELLED", "cancelled by the client")
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        return Reply(None, *_ray_status(exc))

    def _release(self, request_id: str) -> None:
        self._inflight -= 1
        if request_id:
            self._by_id.pop(request_id, None)
            self._cancelled.discard(request_id)


def _unary(method: str):
    async def rpc(self, request, grpc_context=None):
        allowed = grpc_context is None or self.token.allows_metadata(grpc_context.invocation_metadata())
        reply = await self._forward(method, request) if allowed else Reply(None, "UNAUTHENTICATED", AUTH_MESSAGE)
        _set_status(grpc_context, reply)
        return reply.message if reply.code == "OK" else _EMPTY[method]()
    rpc.__name__ = method
    return rpc


_EMPTY = {"Generate": pb.GenerateResponse, "RegisterResidual": pb.RegisterResidualResponse,
          "ListResiduals": pb.ListResidualsResponse, "DeleteResidual": pb.DeleteResidualResponse,
          "GetServerInfo": pb.ServerInfo}
for _method in _EMPTY:
    setattr(Cones2Ingress, _method, _unary(_method))


class _Failed(Exception):
    """Ends a streaming RPC with the status already set on its grpc_context."""


def _set_status(grpc_context, reply: Reply) -> None:
    """The replica id (trailing metadata) and, for an error, the status code on grpc_context (Ray
    Serve's proxy then answers that status, not OK)."""
    if grpc_context is None:
        return
    if reply.replica:
        grpc_context.set_trailing_metadata([(REPLICA_METADATA, reply.replica)])
    if reply.code != "OK":
        grpc_context.set_code(grpc.StatusCode[reply.code])
        grpc_context.set_details(reply.details)


def _ray_status(exc: BaseException) -> tuple[str, str]:
    """Ray's failures as retryable statuses: a dead or vanished replica (the request did not finish
    anywhere) -> UNAVAILABLE; Ray's own queue bound -> RESOURCE_EXHAUSTED; anything else INTERNAL."""
    if isinstance(exc, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        log.warning("an engine replica failed while answering (%s); answered UNAVAILABLE", type(exc).__name__)
        return "UNAVAILABLE", f"an engine replica stopped while answering ({type(exc).__name__}); retry the request"
    if isinstance(exc, (BackPressureError, asyncio.TimeoutError)):
        return ("RESOURCE_EXHAUSTED", "every engine replica's queue is full; retry the request later") if isinstance(
            exc, BackPressureError) else ("UNAVAILABLE", "no engine replica answered in time")
    log.error("internal error", exc_info=exc)
    return "INTERNAL", f"internal error ({type(exc).__name__}); see the Ray Serve logs"
