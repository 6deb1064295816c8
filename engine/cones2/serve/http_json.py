"""The HTTP/JSON adapter: Cones2Service's messages in the proto's JSON mapping (`json_format`), on
the standard library's ThreadingHTTPServer (wire plumbing: http_io.py), over the same `Core` (auth, limits,
health, metrics).

    POST   /v1/generate             GenerateRequest -> GenerateResponse
    POST   /v1/generate/stream      GenerateRequest -> NDJSON: one GenerateEvent per line, or a last
                                    {"error": {"code", "message"}} line
    POST   /v1/requests/{id}/cancel cancels the generation sent with header `X-Request-Id: {id}`
    POST   /v1/residuals            RegisterResidualRequest -> RegisterResidualResponse
    GET    /v1/residuals            ListResidualsResponse
    DELETE /v1/residuals/{id}       DeleteResidualResponse
    GET    /v1/info                 ServerInfo
    GET    /v1/health               {"status": "SERVING"} (200) or "NOT_SERVING" (503); no token needed
    GET    /metrics                 Prometheus text
    GET    /, /studio/{file}        the studio page (static, no token needed; its calls need one)
    POST   /cones2.v1.Cones2Service/{Method}   the unary RPCs by their gRPC names (as on Ray Serve)

Errors answer {"code": <gRPC status name>, "message": ...} with the HTTP status of `core.HTTP_STATUS`
(429 and 503 with Retry-After). A client that disconnects cancels its generation. docs/serve.md.
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from .. import Cones2Error
from . import cones2_pb2 as pb
from .auth import MESSAGE as AUTH_MESSAGE
from .auth import Token
from .core import DONE, HTTP_STATUS, UNARY, Core, TooLarge, status_of
from .http_io import HttpIO, positive_seconds
from .json_mapping import decode, encode, error_body, route
from .studio_assets import HEADERS as STUDIO_HEADERS
from .studio_assets import studio_asset

log = logging.getLogger(__name__)

POLL_S = 0.25    # how often a waiting handler checks whether its client is still connected


class _Handler(HttpIO):
    core: Core
    token: Token

    def do_GET(self): self._dispatch()          # noqa: E704
    def do_POST(self): self._dispatch()         # noqa: E704
    def do_DELETE(self): self._dispatch()       # noqa: E704

    def log_message(self, fmt, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def _dispatch(self) -> None:
        if self.command == "GET" and (page := studio_asset(self.path)) is not None:   # the studio page
            return self.answer(200, page[0], STUDIO_HEADERS, content_type=page[1])
        found = route(self.command, self.path)
        if found is None:
            self.close_connection = True     # its body is not read
            return self.answer(404, error_body("NOT_FOUND", f"no route {self.command} {self.path.split('?')[0]}"))
        method, arg = found
        if method == "Health":
            up = self.core.serving
            return self.answer(200 if up else 503, json.dumps({"status": "SERVING" if up else "NOT_SERVING"}).encode())
        if not self.token.allows(self.headers.get("Authorization")):
            self.core.metrics.observe(method, "UNAUTHENTICATED", 0.0)
            self.close_connection = True     # its body is not read: it must not prefix the next request
            return self.answer(401, error_body("UNAUTHENTICATED", AUTH_MESSAGE), {"WWW-Authenticate": "Bearer"})
        if method == "Metrics":
            return self.answer(200, self.core.metrics.text(), content_type="text/plain; version=0.0.4")
        with self.core.call(method) as call:
            try:
                body = self.read_body()
                if method == "Cancel":
                    self.core.cancel(arg)
                    return self.answer(200, b"{}")
                msg = decode(method, body, arg)
                if method in UNARY:
                    return self.answer(200, encode(getattr(self.core, UNARY[method])(msg)))
                return self._generate(msg, call, stream=method == "GenerateStream")
            except Exception as exc:  # noqa: BLE001 (mapped to a status; the server keeps running)
                call.code, message = status_of(exc)
                retry = {"Retry-After": "1"} if call.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else {}
                status = 413 if isinstance(exc, TooLarge) else HTTP_STATUS[call.code]
                self.answer(status, error_body(call.code, message), retry)

    def _generate(self, msg, call, stream: bool) -> None:
        timeout = positive_seconds(self.headers.get("X-Timeout-Seconds"))
        deadline = time.monotonic() + timeout if timeout is not None else None
        job = self.core.submit(msg, deadline=deadline, stream=stream, request_id=self.headers.get("X-Request-Id", ""))
        try:
            if not stream:
                while not job.wait(POLL_S):
                    if self.client_gone():
                        job.cancel()
                self.answer(200, encode(job.response()))
                return
            self.start_stream()
            while True:
                try:
                    event = job.events.get(timeout=POLL_S)
                except queue.Empty:
                    if self.client_gone():
                        raise ConnectionResetError("the client left") from None
                    continue
                if event is DONE:
                    break
                self.chunk(encode(pb.GenerateEvent(progress=pb.Progress(
                    step=event.step, total_steps=event.total, preview_png=event.preview_png or b""))) + b"\n")
            try:
                line = encode(pb.GenerateEvent(result=job.response()))
            except Exception as exc:  # noqa: BLE001 (the status travels in the stream's last line)
                call.code, message = status_of(exc)
                line = json.dumps({"error": {"code": call.code, "message": message}}).encode()
            self.chunk(line + b"\n")
            self.chunk(b"")
        except OSError:
            call.code = "CANCELLED"
            self.close_connection = True
        finally:
            job.cancel()           # a no-op once it finished; otherwise the client left


class HttpServer:
    """The HTTP/JSON endpoint of `core` on host:port (0 = any free port)."""

    def __init__(self, core: Core, token: Token, host: str, port: int, max_bytes: int):
        self.core, self.token, self.host, self.requested_port, self.max_bytes = core, token, host, port, max_bytes
        self.port: int | None = None
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "HttpServer":
        handler = type("Handler", (_Handler,), {"core": self.core, "token": self.token, "max_bytes": self.max_bytes})
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self._server = server_class((self.host.strip("[]"), self.requested_port), handler)
        except OSError as exc:
            raise Cones2Error(f"cannot listen on {self.host}:{self.requested_port} ({exc.strerror or exc})",
                              "http_port") from None
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="cones2-http", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
