"""HTTP/1.1 plumbing under the HTTP/JSON adapter (http_json.py): reading a bounded body, plain and
chunked (NDJSON) answers, and noticing a client that left. Nothing here knows the service's messages."""
from __future__ import annotations

import select
import socket
from http.server import BaseHTTPRequestHandler

from .. import Cones2Error
from .core import TooLarge


class HttpIO(BaseHTTPRequestHandler):
    """A request handler's wire side; `max_bytes` bounds every request body."""

    protocol_version = "HTTP/1.1"
    timeout = 60                       # a client that stops sending its request is dropped
    max_bytes: int

    def read_body(self) -> bytes:
        """The request body, refused (and left unread) without a Content-Length or over `max_bytes`."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or (length is None and self.command == "POST"):
            self.close_connection = True
            raise Cones2Error("send the body with a Content-Length header", "request")
        n = int(length or 0) if (length or "0").isdigit() else -1
        if not 0 <= n <= self.max_bytes:
            self.close_connection = True     # the body is not read
            raise TooLarge(f"the request is {length} bytes; this server accepts at most {self.max_bytes}")
        return self.rfile.read(n)

    def answer(self, status: int, body: bytes, headers: dict | None = None, content_type="application/json") -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def start_stream(self) -> None:
        """Headers of a chunked NDJSON answer; `chunk` writes its lines, `chunk(b"")` ends it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client closed its side (readable at EOF) while we wait."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def positive_seconds(text: str | None) -> float | None:
    """A header's positive number of seconds, else None (absent or unreadable: no deadline)."""
    try:
        value = float(text) if text else 0.0
    except ValueError:
        return None
    return value if value > 0 else None
