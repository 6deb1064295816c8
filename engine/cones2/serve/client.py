"""`cones2.serve.client.Client`: a small Python client for `cones2-engine serve` (cones2.v1.Cones2Service).

    from cones2.serve.client import Client
    with Client("127.0.0.1:50051") as c:
        dog = c.register_residual("dog.safetensors")                    # -> content id
        out = c.generate("a dog and a mug on the beach", subjects={"dog": dog},
                         boxes={"dog": (0.05, 0.35, 0.5, 0.95), "mug": (0.55, 0.45, 0.95, 0.95)},
                         steps=30, seed=0)
        out.image.save("out.png")

Server errors arrive as `grpc.RpcError` (`.code()`, `.details()`; INVALID_ARGUMENT details start
with the offending field). `HttpClient` speaks the HTTP/JSON API instead (errors: `HttpError`). Needs the `serve` extra: pip install 'cones2-engine[serve]'.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

try:
    import grpc
except ImportError as exc:  # pragma: no cover (depends on the install)
    raise ImportError("cones2.serve.client needs grpcio: pip install 'cones2-engine[serve]'") from exc

from .. import Cones2Error, Residual, get_mode, mode_names
from . import cones2_pb2 as pb
from . import cones2_pb2_grpc as pb_grpc

_ID = re.compile(r"^[0-9a-f]{64}$")
SubjectValue = Residual | bytes | str | os.PathLike


@dataclass
class GenerateResult:
    """A finished generation. `png` or `latents_safetensors` holds the payload, per output format."""

    png: bytes
    latents_safetensors: bytes
    seed: int
    timings: dict[str, float]
    model_id: str
    engine_version: str
    backend: str
    batch_size: int
    width: int
    height: int

    @property
    def image(self):
        """The PNG as a PIL image."""
        from PIL import Image

        return Image.open(io.BytesIO(self.png))

    @property
    def latents(self):
        """Final latents (1, 4, h, w) float32, when requested with output="latents"."""
        from safetensors.torch import load

        return load(self.latents_safetensors)["latents"]

    @classmethod
    def from_pb(cls, r: pb.GenerateResponse) -> "GenerateResult":
        return cls(r.image, r.latents, r.seed, dict(r.timings), r.model_id, r.engine_version, r.backend,
                   r.batch_size, r.width, r.height)


@dataclass
class StepProgress:
    """One GenerateStream progress event: `step` of `total_steps` done; optional preview PNG."""

    step: int
    total_steps: int
    preview_png: bytes = field(default=b"", repr=False)


def build_request(prompt: str, subjects: Mapping[str, SubjectValue] | None = None, *,
                  boxes: Mapping[str, Sequence[float]] | None = None, strengths: Mapping[str, float] | None = None,
                  color_map: bytes | str | os.PathLike | None = None,
                  color_table: Mapping[str, tuple[str, float]] | None = None,
                  subject_positions: Mapping[str, Sequence[int]] | None = None, seed: int | None = None,
                  steps: int | None = None, guidance_steps: int | None = None, guidance_weight: float | None = None,
                  cfg_scale: float | None = None, negative_weight: float | None = None, width: int | None = None,
                  height: int | None = None, mode: str | None = None, layout_resize: str | None = None,
                  output: str = "png", preview_every: int = 0, negative_prompt: str = "") -> pb.GenerateRequest:
    """A GenerateRequest from Python values (unset values take the server's defaults).

    subjects: word -> a `Residual`, safetensors bytes, a registered id, or a local residual file
    (read here, sent inline). boxes: word -> (x0, y0, x1, y1) in [0, 1]; strengths: word -> w+.
    color_map: PNG bytes or a local PNG path, with color_table: "r,g,b" or "#rrggbb" -> (word, strength).
    negative_prompt: what classifier-free guidance steers away from ("" = none).
    """
    req = pb.GenerateRequest(prompt=prompt, preview_every=preview_every, negative_prompt=negative_prompt)
    for name, value in (subjects or {}).items():
        s = req.subjects.add(name=name)
        if isinstance(value, str) and _ID.match(value) and not Path(value).exists():
            s.residual_id = value
        else:
            s.residual_safetensors = residual_bytes(value, f"subjects.{name}")
        s.positions.extend((subject_positions or {}).get(name, ()))
    strengths = strengths or {}
    for name, box in (boxes or {}).items():
        x0, y0, x1, y1 = box
        b = req.layout.boxes.add(subject=name, x0=x0, y0=y0, x1=x1, y1=y1)
        if name in strengths:
            b.strength = strengths[name]
    if color_map is not None:
        png = color_map if isinstance(color_map, bytes) else Path(color_map).read_bytes()
        req.layout.color_map.png = png
        for color, (name, strength) in (color_table or {}).items():
            req.layout.color_map.entries.add(color=color, subject=name, strength=strength)
    for key, value in (("seed", seed), ("steps", steps), ("guidance_steps", guidance_steps),
                       ("guidance_weight", guidance_weight), ("cfg_scale", cfg_scale),
                       ("negative_weight", negative_weight), ("width", width), ("height", height)):
        if value is not None:
            setattr(req, key, value)
    if mode is not None:
        if mode not in mode_names():
            raise Cones2Error(f"must be one of {', '.join(mode_names())}, got {mode!r}", "mode")
        req.mode = pb.SamplingMode.Value(get_mode(mode).proto)
    if layout_resize is not None:
        resizes = {"aligned-corners": pb.LAYOUT_RESIZE_ALIGNED_CORNERS, "cell-centres": pb.LAYOUT_RESIZE_CELL_CENTRES}
        if layout_resize not in resizes:
            raise Cones2Error(f"must be one of {', '.join(resizes)}, got {layout_resize!r}", "layout_resize")
        req.layout_resize = resizes[layout_resize]
    formats = {"png": pb.OUTPUT_FORMAT_PNG, "latents": pb.OUTPUT_FORMAT_LATENTS}
    if output not in formats:
        raise Cones2Error(f"must be 'png' or 'latents', got {output!r}", "output")
    req.output_format = formats[output]
    return req


def residual_bytes(value: SubjectValue, name: str = "residual") -> bytes:
    """Safetensors bytes for a Residual, raw bytes, or a local .safetensors / legacy .pt file."""
    if isinstance(value, Residual):
        return value.to_safetensors_bytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    path = Path(value)
    if path.suffix == ".safetensors" and path.is_file():
        return path.read_bytes()
    return Residual.load(path, name).to_safetensors_bytes()   # .pt files are converted locally


class Client:
    """A connection to a cones2 server.

    target: "host:port". token: bearer token (or None). tls: use TLS; tls_ca: PEM bytes or a file of
    the CA that signed the server certificate (None = system roots). timeout: default deadline in
    seconds per call (None = none).
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 tls_ca: bytes | str | os.PathLike | None = None, timeout: float | None = None,
                 max_message_bytes: int = 64 << 20, options: Sequence[tuple[str, object]] = ()):
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes), *options]
        if tls or tls_ca is not None:
            ca = tls_ca if isinstance(tls_ca, bytes) or tls_ca is None else Path(tls_ca).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.stub = pb_grpc.Cones2ServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout if timeout is None else timeout}

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str, subjects: Mapping[str, SubjectValue] | None = None, *,
                 timeout: float | None = None, **settings) -> GenerateResult:
        """One image; `settings` are `build_request` keywords (boxes, seed, steps, output, ...)."""
        return self.generate_request(build_request(prompt, subjects, **settings), timeout=timeout)

    def generate_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> GenerateResult:
        return GenerateResult.from_pb(self.stub.Generate(request, **self._kw(timeout)))

    def generate_stream(self, prompt: str, subjects: Mapping[str, SubjectValue] | None = None, *,
                        timeout: float | None = None, **settings) -> Iterator[StepProgress | GenerateResult]:
        """StepProgress events, then the GenerateResult. Set preview_every=k for preview PNGs."""
        for event in self.stub.GenerateStream(build_request(prompt, subjects, **settings), **self._kw(timeout)):
            if event.HasField("progress"):
                p = event.progress
                yield StepProgress(p.step, p.total_steps, p.preview_png)
            else:
                yield GenerateResult.from_pb(event.result)

    # ---- residual store -----------------------------------------------------------------------
    def register_residual(self, residual: SubjectValue, *, timeout: float | None = None) -> str:
        """Upload a residual (Residual, safetensors bytes or a local file); returns its content id."""
        data = residual_bytes(residual)
        return self.stub.RegisterResidual(pb.RegisterResidualRequest(safetensors=data), **self._kw(timeout)).residual.id

    def list_residuals(self, *, timeout: float | None = None) -> list[pb.ResidualInfo]:
        return list(self.stub.ListResiduals(pb.ListResidualsRequest(), **self._kw(timeout)).residuals)

    def delete_residual(self, residual_id: str, *, timeout: float | None = None) -> None:
        self.stub.DeleteResidual(pb.DeleteResidualRequest(id=residual_id), **self._kw(timeout))

    # ---- server -------------------------------------------------------------------------------
    def info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... from the standard grpc.health.v1 service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_until_serving(self, timeout: float = 60.0, poll: float = 0.1) -> None:
        """Block until health reports SERVING; TimeoutError after `timeout` seconds."""
        import time

        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                last = self.health(timeout=max(0.1, min(2.0, end - time.monotonic())))
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(poll)
        raise TimeoutError(f"server not SERVING after {timeout}s (last: {last})")


class HttpError(Exception):
    """An error answer of the HTTP/JSON API: `code` (the gRPC status name), `status` (HTTP), `message`,
    `retry_after` (seconds, when the server sent Retry-After)."""

    def __init__(self, code: str, message: str, status: int, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status, self.retry_after = code, message, status, retry_after


class HttpClient:
    """The HTTP/JSON API (`cones2-engine serve --http-port N`) with the standard library: the same
    proto messages, in their JSON mapping. base: "http://127.0.0.1:8080"."""

    def __init__(self, base: str, *, token: str | None = None, timeout: float | None = 120.0):
        self.base, self.timeout = base.rstrip("/"), timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, verb: str, path: str, message=None, response_class=None, headers: Mapping[str, str] = (),
             timeout: float | None = None):
        """One request; the JSON answer parsed into `response_class` (or a dict). Raises HttpError."""
        from google.protobuf import json_format

        with self._open(verb, path, message, headers, timeout) as r:
            body = r.read()
        return json_format.Parse(body, response_class()) if response_class else json.loads(body or b"{}")

    def _open(self, verb, path, message, headers, timeout):
        import urllib.error
        import urllib.request

        from google.protobuf import json_format

        data = None if message is None else (message if isinstance(message, bytes) else
                                             json_format.MessageToJson(message, indent=None).encode())
        req = urllib.request.Request(self.base + path, data=data, method=verb,
                                     headers={"Content-Type": "application/json", **self.headers, **dict(headers)})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                err = json.loads(body)
            except ValueError:
                err = {"code": "UNKNOWN", "message": body[:200].decode(errors="replace")}
            retry = exc.headers.get("Retry-After")
            raise HttpError(err.get("code", "UNKNOWN"), err.get("message", ""), exc.code,
                            float(retry) if retry else None) from None

    def generate_request(self, request: pb.GenerateRequest, *, request_id: str = "",
                         timeout: float | None = None) -> pb.GenerateResponse:
        return self.call("POST", "/v1/generate", request, pb.GenerateResponse, _ids(request_id), timeout)

    def generate_stream_request(self, request: pb.GenerateRequest, *, request_id: str = "",
                                timeout: float | None = None) -> Iterator[pb.GenerateEvent]:
        """Sends the request now; then GenerateEvents as the server sends them (one JSON line each). An
        error before the stream starts raises here; one in the stream's last line, while iterating."""
        from google.protobuf import json_format

        answer = self._open("POST", "/v1/generate/stream", request, _ids(request_id), timeout)

        def events():
            with answer:
                for line in answer:
                    item = json.loads(line)
                    if "error" in item:
                        raise HttpError(item["error"]["code"], item["error"]["message"], 200)
                    yield json_format.ParseDict(item, pb.GenerateEvent())
        return events()

    def cancel(self, request_id: str) -> None:
        self.call("POST", f"/v1/requests/{request_id}/cancel", b"")

    def register_residual(self, residual: SubjectValue) -> str:
        msg = pb.RegisterResidualRequest(safetensors=residual_bytes(residual))
        return self.call("POST", "/v1/residuals", msg, pb.RegisterResidualResponse).residual.id

    def list_residuals(self) -> list[pb.ResidualInfo]:
        return list(self.call("GET", "/v1/residuals", None, pb.ListResidualsResponse).residuals)

    def delete_residual(self, residual_id: str) -> None:
        self.call("DELETE", f"/v1/residuals/{residual_id}")

    def info(self) -> pb.ServerInfo:
        return self.call("GET", "/v1/info", None, pb.ServerInfo)

    def health(self) -> str:
        """"SERVING" or "NOT_SERVING"."""
        try:
            return self.call("GET", "/v1/health", timeout=5.0)["status"]
        except HttpError as exc:
            return "NOT_SERVING" if exc.status == 503 else exc.code


def _ids(request_id: str) -> dict:
    return {"X-Request-Id": request_id} if request_id else {}
