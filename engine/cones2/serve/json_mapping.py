"""The HTTP/JSON routes and the proto's JSON mapping (`json_format`), shared by the in-process HTTP
adapter (http_json.py) and the Ray Serve ingress (ray/deployment.py). Routes: docs/serve.md."""
from __future__ import annotations

import json
import re

from google.protobuf import json_format

from .. import Cones2Error
from . import cones2_pb2 as pb

REQUESTS = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateRequest,
            "RegisterResidual": pb.RegisterResidualRequest, "ListResiduals": pb.ListResidualsRequest,
            "DeleteResidual": pb.DeleteResidualRequest, "GetServerInfo": pb.GetServerInfoRequest}
_ROUTES = [("POST", r"/v1/generate", "Generate"), ("POST", r"/v1/generate/stream", "GenerateStream"),
           ("POST", r"/v1/requests/([^/]+)/cancel", "Cancel"), ("POST", r"/v1/residuals", "RegisterResidual"),
           ("GET", r"/v1/residuals", "ListResiduals"), ("DELETE", r"/v1/residuals/([^/]+)", "DeleteResidual"),
           ("GET", r"/v1/info", "GetServerInfo"), ("GET", r"/v1/health", "Health"), ("GET", r"/metrics", "Metrics"),
           ("POST", r"/cones2\.v1\.Cones2Service/(Generate|RegisterResidual|ListResiduals|DeleteResidual|"
                    r"GetServerInfo)", None)]


def route(verb: str, path: str) -> tuple[str, str] | None:
    """(method name, path argument) of a request line, or None."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    for want, pattern, method in _ROUTES:
        m = re.fullmatch(pattern, path)
        if m and verb == want:
            return (method, m.group(1) if m.groups() else "") if method else (m.group(1), "")
    return None


def decode(method: str, body: bytes, arg: str = ""):
    """The request message of `method` from its JSON body (path argument: DeleteResidual's id)."""
    try:
        msg = json_format.Parse(body or b"{}", REQUESTS[method]())
    except Exception as exc:  # noqa: BLE001 (json_format.ParseError, UnicodeDecodeError, RecursionError...)
        raise Cones2Error(str(exc)[:200], "request") from None
    if method == "DeleteResidual" and arg:
        msg.id = arg
    return msg


def encode(message) -> bytes:
    return json_format.MessageToJson(message, indent=None).encode()


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()
