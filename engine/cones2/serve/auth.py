"""Optional bearer-token auth: a server interceptor that answers UNAUTHENTICATED without the token.

Clients send `authorization: Bearer <token>` metadata. Tokens are compared in constant time
(`hmac.compare_digest`). The standard health service stays open so load balancers can probe.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable

import grpc

from ..errors import Cones2Error, quote

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace stripped); a Cones2Error if missing or empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Cones2Error(f"cannot read the token file {quote(str(path))} ({getattr(exc, 'strerror', None) or exc})",
                          "auth_token_file") from None
    if not token or any(c.isspace() for c in token):
        raise Cones2Error(f"{quote(str(path))} must hold one non-empty token without whitespace", "auth_token_file")
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token. `on_reject(method)` counts rejections."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None):
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject is not None:
            self._on_reject(method)
        return _rejecting(handler)


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""

    def deny(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

    def deny_stream(_request, context):
        deny(_request, context)
        yield  # pragma: no cover (abort raises)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)
