"""The Ray Serve adapter's HTTP side: what Ray Serve's HTTP proxy calls on the ingress (`__call__`),
the routes of `cones2.serve.http_json` and the studio page, answered through the ingress's own
forwarding (ingress.py), so auth, draining and the status mapping are the gRPC side's.
"""
from __future__ import annotations

from .. import cones2_pb2 as pb
from ..auth import MESSAGE as AUTH_MESSAGE
from ..core import HTTP_STATUS, status_of
from ..studio_assets import HEADERS as STUDIO_HEADERS
from ..studio_assets import studio_asset
from .deployment import REPLICA_METADATA, Reply


class HttpEntry:
    """`Cones2Ingress`'s HTTP/JSON entry (a mixin: it uses the ingress's `token`, `_forward`,
    `_stream`, `_by_id` and `_cancelled`)."""

    async def __call__(self, request):
        """HTTP/JSON through Ray Serve's HTTP proxy: the routes of `cones2.serve.http_json` and the
        studio page, but /metrics (Ray exports its own). Cancel-by-id works because this ingress is
        one replica: it holds every call it forwards."""
        from starlette.responses import Response, StreamingResponse

        from ..json_mapping import decode, encode, error_body, route

        def error(reply: Reply) -> Response:
            retry = {"Retry-After": "1"} if reply.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else {}
            return Response(error_body(reply.code, reply.details), HTTP_STATUS.get(reply.code, 500),
                            media_type="application/json", headers={REPLICA_METADATA: reply.replica} | retry)

        if request.method == "GET" and (page := studio_asset(request.url.path)) is not None:   # the studio page
            return Response(page[0], media_type=page[1], headers=STUDIO_HEADERS)
        found = route(request.method, request.url.path)
        if found is None or found[0] == "Metrics":
            return error(Reply(None, "NOT_FOUND", f"no route {request.method} {request.url.path} on Ray Serve"))
        method, arg = found
        if method == "Health":
            up = (await self._forward("GetServerInfo", pb.GetServerInfoRequest(), timeout=5.0)).code == "OK"
            return Response(b'{"status": "%s"}' % (b"SERVING" if up else b"NOT_SERVING"), 200 if up else 503)
        if not self.token.allows(request.headers.get("authorization")):
            return error(Reply(None, "UNAUTHENTICATED", AUTH_MESSAGE))
        if method == "Cancel":
            if arg not in self._by_id:
                return error(Reply(None, "NOT_FOUND", f"request_id: no request {arg!r} in flight"))
            self._cancelled.add(arg)
            self._by_id[arg].cancel()         # Ray cancels the replica's coroutine: the core drops the job
            return Response(b"{}", media_type="application/json")
        rid = request.headers.get("x-request-id", "")
        try:
            msg = decode(method, await request.body(), arg)
        except Exception as exc:  # noqa: BLE001 (a Cones2Error naming "request")
            return error(Reply(None, *status_of(exc)))
        if method == "GenerateStream":
            async def lines():
                async for reply in self._stream(msg, True, rid):
                    yield (encode(reply.message) if reply.code == "OK" else
                           b'{"error": %s}' % error_body(reply.code, reply.details)) + b"\n"
            return StreamingResponse(lines(), media_type="application/x-ndjson")
        reply = await self._forward(method, msg, request_id=rid)
        return error(reply) if reply.code != "OK" else Response(
            encode(reply.message), media_type="application/json", headers={REPLICA_METADATA: reply.replica})
