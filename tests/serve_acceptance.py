"""The acceptance checks every transport must pass (tests/test_serve_acceptance.py runs them on
in-process gRPC and HTTP/JSON, tests/test_serve_ray.py on Ray Serve).

The fuzz cases and their expected answers are written here, from the API's contract in
docs/serve.md (which status, which field the message names); nothing is taken from the product's
code. Memory is bounded against a baseline measured in the same run.
"""
from __future__ import annotations

import collections
import io
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from cones2.serve import cones2_pb2 as pb
from serve_support import Failed, PeakRSS, huge_png, make_residual, png_bytes

MiB = 1 << 20
SIZE = 64


def port_closed(target: str) -> bool:
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, int(port))) != 0


# ---- concurrent clients that retry UNAVAILABLE ---------------------------------------------------------
@dataclass
class ClientsReport:
    answers: dict = field(default_factory=lambda: collections.defaultdict(list))     # request id -> responses
    failures: dict = field(default_factory=lambda: collections.defaultdict(list))    # request id -> codes
    expected: set = field(default_factory=set)

    @property
    def retried(self) -> list[int]:
        return sorted(rid for rid in self.failures if rid in self.answers)


def concurrent_clients_with_retries(make_transport, *, clients: int, per_client: int, make,
                                    on_answer=None) -> ClientsReport:
    """`clients` threads, each sending `per_client` requests (`make(rid)`, rid also the seed) and
    retrying one that failed UNAVAILABLE (up to 8 times). Every answer received is recorded.
    on_answer(report): called after each answer (a test's trigger, e.g. killing a replica)."""
    report, lock = ClientsReport(), threading.Lock()
    report.expected = {1000 + 10 * k + j for k in range(clients) for j in range(per_client)}

    def run(k: int) -> None:
        t = make_transport()
        for j in range(per_client):
            rid = 1000 + 10 * k + j
            for attempt in range(8):
                try:
                    resp = t.generate(make(rid), request_id=f"{rid}-{attempt}")
                except Failed as exc:
                    with lock:
                        report.failures[rid].append(exc.code)
                    if exc.code != "UNAVAILABLE":
                        break
                    time.sleep(0.2 * (attempt + 1))      # a client's backoff, not a measurement
                    continue
                with lock:
                    report.answers[rid].append(resp)
                if on_answer is not None:
                    on_answer(report)
                break

    in_threads(run, clients)
    return report


def in_threads(run, n: int) -> None:
    """run(k) for k in range(n), each in its own thread; waits for all of them."""
    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)                             # only catches a hang
    assert not any(t.is_alive() for t in threads), "a client hung"


def check_nothing_lost(report: ClientsReport, finished: collections.Counter | None, *, whole_record: bool = True) -> None:
    """Every request answered once, with its own result; only retryable failures, and some (the kill
    hit work in flight); `finished` (the server's record of completed requests, by seed): none ran to
    completion twice. whole_record=False: the record may miss requests (a killed Ray replica loses
    the last lines of its log), but must hold most of them, so a duplicate would show."""
    assert set(report.answers) == report.expected, f"lost: {sorted(report.expected - set(report.answers))}"
    assert all(len(v) == 1 for v in report.answers.values())
    assert all(v[0].seed == rid for rid, v in report.answers.items())
    codes = [c for v in report.failures.values() for c in v]
    assert set(codes) <= {"UNAVAILABLE"}, codes
    assert report.retried, "the kill hit no request in flight"
    if finished is not None:
        twice = {rid: n for rid, n in finished.items() if n > 1}
        assert not twice, f"requests completed more than once on the server: {twice}"
        assert set(finished) <= report.expected
        assert set(finished) == report.expected if whole_record else len(finished) >= len(report.expected) // 2


# ---- the seeded fuzz run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    kind: str
    request: pb.GenerateRequest | None       # None: undecodable bytes
    code: str                                # the documented answer
    field: str = ""                          # what an INVALID_ARGUMENT message starts with
    token: bool = True


def fuzz_cases(rng: random.Random, n: int, info: pb.ServerInfo, auth: bool = True) -> list[Case]:
    """`n` cases: a third valid, the rest malformed in one way each, every one with its answer
    (auth: the server requires a token, so a call without one is a case too)."""
    dog = make_residual(1, dim=info.text_dim).to_safetensors_bytes()
    red = png_bytes({(255, 0, 0): (slice(0, 32), slice(0, 32))})

    def base(**kw) -> pb.GenerateRequest:
        return pb.GenerateRequest(prompt="a dog and a mug", steps=rng.randint(1, 2), width=SIZE, height=SIZE,
                                  seed=rng.randrange(2**32), **kw)

    def bad(kind, field, **kw):
        req = base()
        for name, value in kw.items():
            setattr(req, name, value)
        return Case(kind, req, "INVALID_ARGUMENT", field)

    def with_box(kind, subject, box, field):
        req = base()
        req.layout.boxes.add(subject=subject, x0=box[0], y0=box[1], x1=box[2], y1=box[3])
        return Case(kind, req, "INVALID_ARGUMENT", field)

    def with_subject(kind, field, **kw):
        req = base()
        req.subjects.add(**kw)
        return Case(kind, req, "INVALID_ARGUMENT", field)

    def with_map(kind, png, code, field=""):
        req = base()
        req.layout.color_map.png = png
        req.layout.color_map.entries.add(color="255,0,0", subject="dog")
        return Case(kind, req, code, field)

    def valid():
        req, which = base(), rng.choice(["plain", "box", "residual", "map"])
        if which == "box":
            req.layout.boxes.add(subject="dog", x0=0.0, y0=0.1, x1=0.5, y1=0.9)
        elif which == "residual":
            req.subjects.add(name="dog", residual_safetensors=dog)
        elif which == "map":
            return with_map("valid:map", red, "OK")
        return Case(f"valid:{which}", req, "OK")

    makers = [
        lambda: bad("steps", "steps", steps=rng.choice([0, -3, info.max_steps + 1, 2**31 - 1])),
        lambda: bad("width", "width", width=rng.choice([65, info.max_resolution + 64])),
        lambda: bad("nan", "guidance_weight", guidance_weight=rng.choice([float("nan"), float("inf")])),
        lambda: bad("cfg", "cfg_scale", cfg_scale=float("nan")),
        lambda: bad("prompt", "prompt", prompt=""),
        lambda: bad("mode", "mode", mode=99),
        lambda: with_box("box order", "dog", (0.6, 0.1, 0.2, 0.9), "layout"),
        lambda: with_box("box subject", "cat", (0.0, 0.0, 0.5, 0.5), "layout"),
        lambda: with_subject("subject word", "subjects", name="cat", residual_safetensors=dog),
        lambda: with_subject("residual id", "subjects[0].residual_id", name="dog", residual_id="ab" * 32),
        lambda: with_subject("residual bytes", "subjects[0].residual", name="dog", residual_safetensors=b"\0" * 40),
        lambda: with_map("huge map", huge_png(), "INVALID_ARGUMENT", "layout.color_map.png"),
        lambda: Case("undecodable", None, "INVALID_ARGUMENT", "request"),
    ]
    if auth:
        makers.append(lambda: Case("no token", base(), "UNAUTHENTICATED", token=False))
    return [valid() if i % 3 == 0 else rng.choice(makers)() for i in range(n)]


def _send(t, bad_token, case: Case):
    client = t if case.token else bad_token
    if case.request is None:
        return client.garbage()
    return client.generate(case.request)


def _run(cases: list[Case], make_transport, clients: int) -> list[tuple[Case, str, str, object]]:
    """(case, code, message, response) for every case, sent from `clients` threads."""
    results, lock, todo = [], threading.Lock(), iter(cases)

    def run():
        t, wrong = make_transport(), make_transport(token="wrong-token")
        while True:
            with lock:
                case = next(todo, None)
            if case is None:
                return
            try:
                out = (case, "OK", "", _send(t, wrong, case))
            except Failed as exc:
                out = (case, exc.code, exc.message, None)
            with lock:
                results.append(out)

    in_threads(lambda _k: run(), clients)
    return results


def fuzz_and_check(make_transport, server, *, seed: int, n: int = 48, clients: int = 6, auth: bool = True) -> None:
    """Baseline: as many valid requests as the run has, at the same concurrency; then the seeded mix.
    Each case gets its documented code (INVALID_ARGUMENT naming its field), every valid one a PNG of
    the asked size and seed; the server ends SERVING, idle, its workers alive; memory grows no more
    than the baseline's growth plus half of what decoding one 4096x4096 colour map would take.
    server: the in-process Server (None on Ray: its state is checked through the API only, and its
    memory, in other processes, is not measured here)."""
    t = make_transport()
    info = t.info()
    cases = fuzz_cases(random.Random(seed), n, info, auth)
    kinds = collections.Counter(c.kind.split(":")[0] for c in cases)
    assert kinds["valid"] >= n // 3 and len(kinds) >= 6, kinds
    rng = random.Random(seed + 1)
    baseline_cases = [Case("valid", pb.GenerateRequest(prompt="a dog and a mug", steps=rng.randint(1, 2), width=SIZE,
                                                       height=SIZE, seed=i), "OK") for i in range(kinds["valid"])]
    _run(baseline_cases[:2], make_transport, 1)                               # warm
    with PeakRSS() as baseline:
        _run(baseline_cases, make_transport, clients)
    with PeakRSS() as mem:
        results = _run(cases, make_transport, clients)

    assert len(results) == n
    wrong = []
    for case, code, message, resp in results:
        if code != case.code or (case.field and not message.startswith(f"{case.field}")):
            wrong.append((case.kind, case.code, case.field, code, message[:120]))
        elif code == "OK":
            image = Image.open(io.BytesIO(resp.image))
            if image.size != (SIZE, SIZE) or resp.seed != case.request.seed:
                wrong.append((case.kind, "size/seed", image.size, resp.seed))
        assert len(message) <= 300 and "Traceback" not in message
    assert not wrong, wrong[:10]
    assert t.health() == "SERVING" and t.generate(pb.GenerateRequest(prompt="a dog", steps=1, width=SIZE,
                                                                     height=SIZE)).width == SIZE
    if server is None:
        return
    assert server.jobs.depth() == 0 and server.jobs.stats.running == 0
    assert all(w.is_alive() for w in server.workers)
    growth, allowed = mem.peak - mem.start, (baseline.peak - baseline.start) + 32 * MiB
    print(f"fuzz: {dict(kinds)}; resident memory +{growth / MiB:.1f} MiB (baseline +"
          f"{(baseline.peak - baseline.start) / MiB:.1f} MiB)")
    assert growth <= allowed, f"memory grew {growth / MiB:.0f} MiB, baseline + 32 MiB is {allowed / MiB:.0f} MiB"
