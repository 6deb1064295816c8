"""The hostile (and valid) requests of the gRPC fuzzer, each with the codes docs/serve.md promises.

`CaseMaker()` draws one `Case` from its `rng`: a malformed request of some kind (non-finite and
beyond-float32 floats, wire-type-extreme ints, unknown enums, oversized prompts, names, positions
and repeated fields, bad colour maps, bad residual bytes, random and undecodable bytes, missing
tokens, messages over the transport limit) or a valid one. Sent by `serve_fuzz` (bench/load.py --fuzz).
"""
from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass
from typing import Callable

from cones2.serve import cones2_pb2 as pb

BAD = "INVALID_ARGUMENT"
HUGE_FLOATS = (float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 1e39, -1e39, 3.5e38, -3.5e38)
INT32 = (2**31 - 1, -2**31)
PROMPTS = ("a dog and a mug", "a dog on the beach", "a photo of a dog and a mug in the snow", "a mug")


@dataclass(frozen=True)
class Case:
    """One call: `method` of Cones2Service (or "Health/Check"), its raw request bytes, the codes allowed."""

    kind: str
    method: str
    payload: bytes
    expected: frozenset
    auth: str = "good"                # "good", "none" or "wrong"

    @property
    def valid(self) -> bool:
        return self.expected == {"OK"}


class CaseMaker:
    """Draws cases from `rng`. The server's limits come from GetServerInfo (`info`); the message limit
    and colour-map pixel limit are the server's flags (defaults as `cones2-engine serve`)."""

    def __init__(self, rng: random.Random, info: pb.ServerInfo, *, size: int = 64, max_steps: int = 2,
                 valid_fraction: float = 0.15, token: bool = True, max_message_bytes: int = 32 << 20,
                 max_layout_pixels: int = 2048 * 2048, max_layout_png_bytes: int = 4 << 20):
        self.rng, self.info, self.size, self.max_steps = rng, info, size, max_steps
        self.valid_fraction, self.token = valid_fraction, token
        self.max_message_bytes, self.max_layout_pixels = max_message_bytes, max_layout_pixels
        self.max_layout_png_bytes = max_layout_png_bytes
        self.residuals = [_residual_bytes(info.text_dim, seed) for seed in range(4)]
        self.red = _png(size, size, ((255, 0, 0), (0, 0, size // 2, size)))
        self.maps = {"huge": _flat_png(4096, 4096), "bomb": _cached(("bomb", size), lambda: _text_bomb(self.red))}
        self.makers: list[Callable[[], Case]] = [
            self._float, self._int, self._enum, self._size, self._colour_map, self._residual, self._words,
            self._undecodable, self._other_rpcs]
        if token:
            self.makers.append(self._auth)
        if max_message_bytes <= 8 << 20:
            self.makers.append(self._oversized)

    def __call__(self) -> Case:
        if self.rng.random() < self.valid_fraction:
            return self._valid()
        return self.rng.choice(self.makers)()

    # ---- valid --------------------------------------------------------------------------------
    def _base(self, prompt: str | None = None) -> pb.GenerateRequest:
        r = self.rng
        req = pb.GenerateRequest(prompt=prompt or r.choice(PROMPTS), steps=r.randint(1, self.max_steps),
                                 width=self.size, height=self.size, seed=r.randrange(2**63))
        return req

    def _valid(self) -> Case:
        r = self.rng
        kind = r.choice(["plain", "boxes", "residual", "colour map", "text bomb map", "bounds", "latents",
                         "stream", "list", "info", "register"])
        if kind in ("list", "info", "register"):
            method = {"list": "ListResiduals", "info": "GetServerInfo", "register": "RegisterResidual"}[kind]
            msg = (pb.ListResidualsRequest() if kind == "list" else pb.GetServerInfoRequest() if kind == "info"
                   else pb.RegisterResidualRequest(safetensors=r.choice(self.residuals)))
            return Case(f"valid:{kind}", method, msg.SerializeToString(), frozenset({"OK"}))
        req = self._base("a dog and a mug")
        if kind == "boxes":
            x = r.uniform(0, 0.4)
            req.layout.boxes.add(subject="dog", x0=x, y0=0.1, x1=x + 0.5, y1=0.9, strength=r.uniform(0, 10))
        elif kind == "residual":
            req.subjects.add(name="dog", residual_safetensors=r.choice(self.residuals))
        elif kind in ("colour map", "text bomb map"):
            req.layout.color_map.png = self.red if kind == "colour map" else self.maps["bomb"]
            req.layout.color_map.entries.add(color="255,0,0", subject="dog", strength=r.uniform(0, 5))
        elif kind == "bounds":    # every value at its documented bound
            req.cfg_scale, req.guidance_weight, req.negative_weight = 100.0, 10.0, -1e9
            req.layout.boxes.add(subject="mug", x0=0.0, y0=0.0, x1=1.0, y1=1.0, strength=1e4)
        elif kind == "latents":
            req.output_format = pb.OUTPUT_FORMAT_LATENTS
        method = "GenerateStream" if kind == "stream" else "Generate"
        return Case(f"valid:{kind}", method, req.SerializeToString(), frozenset({"OK"}))

    def _bad(self, kind: str, req, method: str = "Generate", expected=BAD) -> Case:
        payload = req if isinstance(req, bytes) else req.SerializeToString()
        return Case(kind, method, payload, frozenset({expected}))

    # ---- malformed ----------------------------------------------------------------------------
    def _float(self) -> Case:
        r = self.rng
        value = r.choice(HUGE_FLOATS)
        where = r.choice(["guidance_weight", "cfg_scale", "negative_weight", "x0", "y0", "x1", "y1", "strength",
                          "colour strength"])
        req = self._base("a dog and a mug")
        if where in ("guidance_weight", "cfg_scale", "negative_weight"):
            setattr(req, where, value)
        elif where == "colour strength":
            req.layout.color_map.png = self.red
            req.layout.color_map.entries.add(color="255,0,0", subject="dog", strength=value)
        else:
            box = req.layout.boxes.add(subject="dog", x0=0.1, y0=0.1, x1=0.6, y1=0.9)
            setattr(box, where, value)
        return self._bad(f"float:{where}", req)

    def _int(self) -> Case:
        r = self.rng
        req = self._base()
        where = r.choice(["steps", "width", "height", "guidance_steps", "seed", "preview_every", "position"])
        if where == "steps":
            req.steps = r.choice([0, -1, self.info.max_steps + 1, *INT32])
        elif where in ("width", "height"):
            setattr(req, where, r.choice([0, -64, 65, 100, self.info.max_resolution + 64, *INT32]))
        elif where == "guidance_steps":
            req.guidance_steps = r.choice([-1, 10**6 + 1, *INT32])
        elif where == "seed":
            req.seed = r.choice([2**63, 2**64 - 1])
        elif where == "preview_every":
            req.preview_every = r.choice([-1, -2**31])
        else:
            req.prompt = "a dog and a mug"
            req.subjects.add(name="dog", residual_safetensors=self.residuals[0], positions=[r.choice([0, -1, 76, *INT32])])
        return self._bad(f"int:{where}", req)

    def _enum(self) -> Case:
        req = self._base()
        where = self.rng.choice(["output_format", "mode"])
        setattr(req, where, self.rng.choice([-1, 3, 99, *INT32]))
        return self._bad(f"enum:{where}", req)

    def _size(self) -> Case:
        r = self.rng
        req = self._base("a dog and a mug")
        long = "d" * r.choice([101, 10_000, 100_000])
        where = r.choice(["prompt", "empty prompt", "subject name", "box subject", "colour subject", "colour",
                          "residual id", "positions", "subjects", "boxes", "colour entries"])
        if where == "prompt":
            req.prompt = "a dog " * r.choice([400, 20_000])
        elif where == "empty prompt":
            req.prompt = r.choice(["", "   ", "\n\t"])
        elif where == "subject name":
            req.subjects.add(name=long, residual_safetensors=self.residuals[0])
        elif where == "box subject":
            req.layout.boxes.add(subject=long, x1=1, y1=1)
        elif where == "colour subject":
            req.layout.color_map.png = self.red
            req.layout.color_map.entries.add(color="255,0,0", subject=long)
        elif where == "colour":
            req.layout.color_map.png = self.red
            req.layout.color_map.entries.add(color="1" * len(long), subject="dog")
        elif where == "residual id":
            req.subjects.add(name="dog", residual_id=r.choice([long, "../../etc/passwd", "f" * 64]))
        elif where == "positions":
            req.subjects.add(name="dog", residual_safetensors=self.residuals[0], positions=range(r.choice([76, 100_000])))
        elif where == "subjects":
            req.prompt = " ".join(f"w{i}" for i in range(12))
            for i in range(self.info.max_subjects + 1):
                req.subjects.add(name=f"w{i}", residual_safetensors=self.residuals[0])
        elif where == "boxes":
            for i in range(r.choice([self.info.max_subjects + 1, 1000])):
                req.layout.boxes.add(subject=f"w{i}", x1=1, y1=1)
        else:
            req.layout.color_map.png = self.red
            for i in range(r.choice([65, 1000])):
                req.layout.color_map.entries.add(color=f"{i % 256},{i // 256},0", subject="dog")
        return self._bad(f"size:{where}", req)

    def _colour_map(self) -> Case:
        r = self.rng
        req = self._base("a dog and a mug")
        cm = req.layout.color_map
        cm.png = self.red
        cm.entries.add(color="255,0,0", subject="dog")
        where = r.choice(["4096x4096", "over the pixel limit", "0x0", "truncated", "not png", "random after signature",
                          "colour absent", "colour malformed", "no entries", "with boxes", "too many bytes"])
        if where == "4096x4096":
            cm.png = self.maps["huge"]
        elif where == "over the pixel limit":
            side = int(self.max_layout_pixels ** 0.5) + 1
            cm.png = _ihdr_only(side, side)
        elif where == "0x0":
            cm.png = _ihdr_only(0, r.choice([0, 64]))
        elif where == "truncated":
            cm.png = self.red[: r.randint(0, len(self.red) - 24)]   # into the pixel data (its last bytes are checksums)
        elif where == "not png":
            cm.png = r.choice([b"", b"GIF89a" + r.randbytes(64), r.randbytes(200)])
        elif where == "random after signature":
            cm.png = self.red[:33] + r.randbytes(r.randint(1, 500))
        elif where == "colour absent":
            cm.entries[0].color = "0,255,0"
        elif where == "colour malformed":
            cm.entries[0].color = r.choice(["red", "256,0,0", "#ff00", "1,2", "-1,0,0", "#gg0000"])
        elif where == "no entries":
            del cm.entries[:]
        elif where == "with boxes":
            req.layout.boxes.add(subject="dog", x1=1, y1=1)
        else:
            if self.max_layout_png_bytes + 1024 > self.max_message_bytes:
                cm.png = self.maps["huge"]
            else:
                cm.png = self.red + bytes(self.max_layout_png_bytes)
        return self._bad(f"colour map:{where}", req)

    def _residual(self) -> Case:
        r = self.rng
        where = r.choice(["junk", "empty", "wrong D", "NaN", "3 rows", "huge header", "echoing header", "truncated",
                          "too large"])
        good = self.residuals[0]
        data = {"junk": r.randbytes(r.randint(1, 300)), "empty": b"",
                "wrong D": _residual_bytes(self.info.text_dim + 16, 1),
                "NaN": _residual_bytes(self.info.text_dim, 2, nan=True),
                "3 rows": _residual_bytes(self.info.text_dim, 3, rows=3),
                "huge header": b"\xff" * 8 + b"{}", "echoing header": _echoing_header(),
                "truncated": good[: r.randint(1, len(good) - 1)],
                "too large": b"\0" * (self.info.max_residual_bytes + 1)}[where]
        if where == "too large" and len(data) + 1024 > self.max_message_bytes:
            data = b""
        if r.random() < 0.3:     # the same bytes through RegisterResidual ("3 rows" is fine there)
            if where == "3 rows":
                data = b""
            return self._bad(f"residual:{where}", pb.RegisterResidualRequest(safetensors=data), "RegisterResidual")
        req = self._base("a dog and a mug")
        req.subjects.add(name="dog", residual_safetensors=data)
        return self._bad(f"residual:{where}", req)

    def _words(self) -> Case:
        r = self.rng
        where = r.choice(["subject not in prompt", "layout word not in prompt", "past 77 tokens", "box vanishes",
                          "duplicate subject", "duplicate box"])
        req = self._base("a dog and a mug")
        if where == "subject not in prompt":
            req.subjects.add(name="cat", residual_safetensors=self.residuals[0])
        elif where == "layout word not in prompt":
            req.layout.boxes.add(subject="cat", x1=1, y1=1)
        elif where == "past 77 tokens":
            req.prompt = "a " * 80 + "dog"
            req.subjects.add(name="dog", residual_safetensors=self.residuals[0])
        elif where == "box vanishes":
            req.layout.boxes.add(subject="dog", x0=0.5, y0=0.5, x1=0.505, y1=0.505)
        elif where == "duplicate subject":
            for _ in range(2):
                req.subjects.add(name="dog", residual_safetensors=self.residuals[0])
        else:
            for _ in range(2):
                req.layout.boxes.add(subject="dog", x1=1, y1=1)
        return self._bad(f"words:{where}", req)

    def _undecodable(self) -> Case:
        r = self.rng
        method = r.choice(["Generate", "GenerateStream", "RegisterResidual", "ListResiduals", "DeleteResidual",
                           "GetServerInfo", "Health/Check"])
        data = r.randbytes(r.randint(0, 2000))
        if r.random() < 0.5:
            return self._bad("bytes:undecodable", _undecodable(data), method)
        if _decodes(data, method):      # random bytes that happen to parse: the server judges the message
            return Case("bytes:random, decodable", method, data, frozenset({"OK", BAD, "NOT_FOUND"}))
        return self._bad("bytes:random", data, method)

    def _other_rpcs(self) -> Case:
        r = self.rng
        where = r.choice(["delete malformed id", "delete unknown id"])
        if where == "delete unknown id":   # documented: NOT_FOUND
            rid = "".join(r.choice("0123456789abcdef") for _ in range(64))
            return self._bad(f"rpc:{where}", pb.DeleteResidualRequest(id=rid), "DeleteResidual", "NOT_FOUND")
        rid = r.choice(["", "../x", "A" * 64, "a" * 10_000, "f" * 63])
        return self._bad(f"rpc:{where}", pb.DeleteResidualRequest(id=rid), "DeleteResidual")

    def _auth(self) -> Case:
        case = self._valid()
        return Case(f"auth:{case.kind}", case.method, case.payload, frozenset({"UNAUTHENTICATED"}),
                    self.rng.choice(["none", "wrong"]))

    def _oversized(self) -> Case:
        req = self._base()
        req.subjects.add(name="dog", residual_safetensors=bytes(self.max_message_bytes + 1))
        return self._bad("size:message over the transport limit", req, expected="RESOURCE_EXHAUSTED")


# ---- payloads -----------------------------------------------------------------------------------
_CASE_CACHE: dict = {}


def _residual_bytes(dim: int, seed: int, rows: int = 1, nan: bool = False) -> bytes:
    key = ("residual", dim, seed, rows, nan)
    if key not in _CASE_CACHE:
        import torch

        from cones2 import Residual

        t = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * 0.3
        data = Residual(t, word="dog").to_safetensors_bytes()
        if nan:      # patch the first float to NaN after the header
            n = struct.unpack("<Q", data[:8])[0]
            data = data[: 8 + n] + struct.pack("<f", float("nan")) + data[12 + n :]
        _CASE_CACHE[key] = data
    return _CASE_CACHE[key]


def _png(width: int, height: int, *regions) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.zeros((height, width, 3), np.uint8)
    for rgb, (x0, y0, x1, y1) in regions:
        arr[y0:y1, x0:x1] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _cached(key, make: Callable[[], bytes]) -> bytes:
    if key not in _CASE_CACHE:
        _CASE_CACHE[key] = make()
    return _CASE_CACHE[key]


def _flat_png(width: int, height: int) -> bytes:
    """A red width x height PNG, written row by row (never width x height pixels in memory)."""
    import zlib

    def make() -> bytes:
        pack = zlib.compressobj(9)
        row = b"\0" + b"\xff\0\0" * width
        idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
        return _ihdr_only(width, height) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")

    return _cached(("flat", width, height), make)


def _chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _text_bomb(png: bytes, chunks: int = 60) -> bytes:
    """`png` plus `chunks` zTXt chunks of 1 MiB each once inflated (a few KiB each on the wire)."""
    import zlib

    text = zlib.compress(b"x" * (1 << 20), 9)
    chunks = [_chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + text) for i in range(chunks)]
    return png[:33] + b"".join(chunks) + png[33:]


def _ihdr_only(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR claiming width x height (RGB, 8 bit), then nothing."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _echoing_header() -> bytes:
    header = b'{"residual": "' + b"A" * 5000 + b'"}'
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _undecodable(data: bytes) -> bytes:
    """`data`, made certain not to parse as any message: wire type 7 does not exist."""
    return b"\x0f" + data


def _decodes(data: bytes, method: str) -> bool:
    from google.protobuf.message_factory import GetMessageClass

    if method == "Health/Check":
        from grpc_health.v1 import health_pb2

        message = health_pb2.HealthCheckRequest
    else:
        message = GetMessageClass(pb.DESCRIPTOR.services_by_name["Cones2Service"].methods_by_name[method].input_type)
    try:
        message.FromString(data)
    except Exception:  # noqa: BLE001 (DecodeError and friends)
        return False
    return True
