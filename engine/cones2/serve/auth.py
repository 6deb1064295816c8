"""Bearer-token auth, once for every transport, and the rule on where a server may listen.

Clients send `authorization: Bearer <token>` (gRPC metadata or the HTTP header); `Token.allows`
compares it in constant time (`hmac.compare_digest`). The gRPC interceptor, the HTTP adapter and
the Ray ingress all ask `Token.allows`. Health stays open so load balancers can probe.
"""
from __future__ import annotations

import hmac
import ipaddress
import socket
from pathlib import Path
from typing import Callable

import grpc

from ..errors import Cones2Error, quote

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
MESSAGE = "missing or wrong bearer token (metadata or header 'authorization')"


class Token:
    """The token every call must carry, or None (no auth: every call is allowed)."""

    def __init__(self, token: str | None):
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether the `authorization` value a call carried is the expected one."""
        if self._expected is None:
            return True
        given = authorization.encode() if isinstance(authorization, str) else bytes(authorization or b"")
        return hmac.compare_digest(given, self._expected)

    def allows_metadata(self, metadata) -> bool:
        """The same check on gRPC (key, value) metadata pairs."""
        return self.allows(next((v for k, v in metadata or () if k == "authorization"), None))


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) resolves only to loopback addresses."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(host: str, token: str | None, *, allow_unauthenticated: bool, every_interface: bool = False) -> None:
    """Refuse (Cones2Error, one line) to listen beyond loopback without a token, unless the operator
    said so (`--allow-unauthenticated-network`). every_interface: the transport binds all interfaces
    whatever `host` says (Ray Serve's gRPC proxy)."""
    if token or allow_unauthenticated or (is_loopback(host) and not every_interface):
        return
    where = "every interface" if every_interface else host
    raise Cones2Error(f"refusing to listen on {where} without a token: give --auth-token-file, or pass "
                      "--allow-unauthenticated-network to accept unauthenticated calls from the network", "host")


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
    """Rejects gRPC calls without the right bearer token. `on_reject(method)` counts rejections."""

    def __init__(self, token: Token, on_reject: Callable[[str], None] | None = None):
        self._token = token
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES) or self._token.allows_metadata(handler_call_details.invocation_metadata):
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
        context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)

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
