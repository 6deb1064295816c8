"""A seeded gRPC fuzzer for a running Cones2Service: hostile requests of every kind, valid ones mixed in.

Each case (`serve_fuzz_cases`) carries the status codes docs/serve.md promises for it
(INVALID_ARGUMENT for a malformed request, UNAUTHENTICATED without the token, RESOURCE_EXHAUSTED
over the message limit, OK for a valid one). Requests are sent as raw bytes (identity serializers),
so undecodable bodies travel as they are; `http=` sends them over the HTTP/JSON API instead.
Used by `bench/load.py --fuzz N [--transport http]` (bench tooling: the test suite's fuzz run is
tests/serve_acceptance.py, with expectations of its own).

    report = run_fuzz("127.0.0.1:50051", n=300, seed=0, token="secret")
    assert report.failures == [] and report.codes.get("INTERNAL", 0) == 0
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from cones2.serve import cones2_pb2 as pb
from serve_fuzz_cases import Case, CaseMaker

__all__ = ["Case", "CaseMaker", "FuzzReport", "check_result", "run_fuzz", "send"]

SERVICE = "/cones2.v1.Cones2Service/"


@dataclass
class FuzzReport:
    """What came back. failures: (kind, expected codes, got, details) of every unexpected answer."""

    sent: int = 0
    valid: int = 0
    valid_ok: int = 0
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    longest_details: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"sent": self.sent, "valid": self.valid, "valid_ok": self.valid_ok, "malformed": self.sent - self.valid,
                "internal": self.codes.get("INTERNAL", 0), "failures": len(self.failures),
                "codes": dict(sorted(self.codes.items())), "kinds": len(self.kinds),
                "longest_details_chars": self.longest_details, "seconds": round(self.seconds, 2),
                "requests_per_second": round(self.sent / self.seconds, 2) if self.seconds else 0.0,
                "first_failures": [list(map(str, f)) for f in self.failures[:20]]}


def send(channel: grpc.Channel, case: Case, token: str | None, timeout: float) -> tuple[str, str, bytes]:
    """Send `case` as raw bytes; (status code name, details, response bytes or b"")."""
    path = "/grpc.health.v1.Health/Check" if case.method == "Health/Check" else SERVICE + case.method
    metadata = ()
    if token and case.auth != "none":
        metadata = (("authorization", f"Bearer {token if case.auth == 'good' else token + 'x'}"),)
    try:
        if case.method == "GenerateStream":
            events = list(channel.unary_stream(path)(case.payload, timeout=timeout, metadata=metadata))
            return "OK", "", events[-1] if events else b""
        return "OK", "", channel.unary_unary(path)(case.payload, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", b""


def send_http(base: str, case: Case, token: str | None, timeout: float) -> tuple[str, str, bytes]:
    """The same case over the HTTP/JSON API: the message as JSON (bytes that do not decode travel as
    they are, as a body that is not JSON); (status code name, message, response as proto bytes)."""
    import json
    import urllib.error
    import urllib.request

    from google.protobuf import json_format

    from cones2.serve.json_mapping import REQUESTS

    headers = {"Content-Type": "application/json"}
    if token and case.auth != "none":
        headers["Authorization"] = f"Bearer {token if case.auth == 'good' else token + 'x'}"
    if case.method == "Health/Check":
        path, body, verb = "/v1/health", None, "GET"
    else:
        path, verb = ("/v1/generate/stream" if case.method == "GenerateStream"
                      else f"/cones2.v1.Cones2Service/{case.method}"), "POST"
        try:
            body = json_format.MessageToJson(REQUESTS[case.method].FromString(case.payload), indent=None).encode()
        except Exception:  # noqa: BLE001 (undecodable on purpose: send it as it is)
            body = case.payload
    req = urllib.request.Request(base + path, data=body, method=verb, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())
        except ValueError:
            err = {}
        return err.get("code", f"HTTP {exc.code}"), err.get("message", ""), b""
    except OSError as exc:           # the server closed the connection on an oversized body
        return "RESOURCE_EXHAUSTED" if len(body or b"") > 1 << 20 else "UNAVAILABLE", str(exc), b""
    if case.method == "Health/Check":
        return "OK", "", b""
    if case.method == "GenerateStream":
        last = json.loads(data.splitlines()[-1])
        if "error" in last:
            return last["error"]["code"], last["error"]["message"], b""
        return "OK", "", json_format.ParseDict(last, pb.GenerateEvent()).SerializeToString()
    message = {"Generate": pb.GenerateResponse}.get(case.method)
    return "OK", "", json_format.Parse(data, message()).SerializeToString() if message else b""


def check_result(case: Case, data: bytes, size: int) -> str | None:
    """Why a successful reply to a valid Generate/GenerateStream case is wrong, or None."""
    if case.method not in ("Generate", "GenerateStream"):
        return None
    resp = pb.GenerateEvent.FromString(data).result if case.method == "GenerateStream" else \
        pb.GenerateResponse.FromString(data)
    if (resp.width, resp.height) != (size, size):
        return f"size {resp.width}x{resp.height}"
    if not (resp.image.startswith(b"\x89PNG") or resp.latents):
        return "neither a PNG nor latents"
    return None


def run_fuzz(target: str, n: int, *, seed: int = 0, clients: int = 8, token: str | None = None,
             timeout: float = 120.0, size: int = 64, max_steps: int = 2, valid_fraction: float = 0.15,
             progress: bool = False, http: str | None = None, **limits) -> FuzzReport:
    """Send `n` cases from `clients` threads (case i is drawn from seed and i alone, so a run repeats
    exactly whatever the thread timing). limits: CaseMaker's max_message_bytes / max_layout_pixels /
    max_layout_png_bytes of the server. http: "http://host:port" sends the cases over HTTP/JSON."""
    meta = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options) as channel:
        info = pb.ServerInfo.FromString(channel.unary_unary(SERVICE + "GetServerInfo")(
            pb.GetServerInfoRequest().SerializeToString(), timeout=30, metadata=meta))
    report, lock, counter = FuzzReport(), threading.Lock(), iter(range(n))
    CaseMaker(random.Random(seed), info, size=size, **limits)     # builds the shared payloads once, up front
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="fuzz", unit="req")

    def worker() -> None:
        maker = CaseMaker(random.Random(seed), info, size=size, max_steps=max_steps, valid_fraction=valid_fraction,
                          token=bool(token), **limits)
        with grpc.insecure_channel(target, options) as channel:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                maker.rng = random.Random(seed * 1_000_003 + i)
                case = maker()
                code, details, data = (send_http(http, case, token, timeout) if http else
                                       send(channel, case, token, timeout))
                expected = case.expected
                if http and case.method == "Health/Check":   # GET /v1/health carries no message to be malformed
                    expected = frozenset({"OK"})
                wrong = None
                if code not in expected:
                    wrong = f"got {code}"
                elif code == "OK" and case.valid:
                    wrong = check_result(case, data, size)
                with lock:
                    report.sent += 1
                    report.codes[code] += 1
                    report.kinds[case.kind] += 1
                    report.longest_details = max(report.longest_details, len(details))
                    if case.valid:
                        report.valid += 1
                        report.valid_ok += code == "OK" and wrong is None
                    if wrong is not None:
                        report.failures.append((case.kind, case.method, "/".join(sorted(expected)), wrong,
                                                details[:200]))
                    if bar is not None:
                        bar.update(1)

    start = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.monotonic() - start
    if bar is not None:
        bar.close()
    return report
