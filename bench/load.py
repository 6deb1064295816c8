"""Load and fuzz runs against `cones2-engine serve` on 127.0.0.1: a server subprocess this script starts,
watches (resident memory sampled every 0.1 s) and stops with SIGTERM; embedded tiny model unless --model.

Load (default): --clients threads send a mix of valid and malformed requests for --duration seconds
(or --requests each), once per --max-batch value. Printed per run: valid requests/s, p50/p95/p99
latency of valid requests, rejections (RESOURCE_EXHAUSTED), malformed requests answered
INVALID_ARGUMENT, INTERNAL answers, mean batch size, server memory; then the batching gain.

--transport grpc|http|ray: what the clients talk to. grpc / http: the in-process server's two
transports (one serving core behind both). ray: `cones2-engine serve --ray` (a local Ray started by
the server command, --replicas engine replicas of one CPU each, with a token: Ray's gRPC proxy
listens on every interface), clients on its gRPC proxy. Resident memory is the server's whole
process tree (with Ray: its GCS, raylet, proxy and replicas).

Fuzz (--fuzz N): N seeded hostile cases of `bench/serve_fuzz.py` (every kind of malformed request,
random and undecodable bytes, missing tokens, oversized messages; valid ones mixed in) from
--clients threads, against a server with a token and small transport/field limits.

Both fail (exit 1) on a crash (server gone, health not SERVING after, SIGTERM exit code != 0), any
INTERNAL, any lost valid request (neither a result nor a rejection), or a malformed request answered
otherwise than documented. --json writes a results record (bench/harness/results.py: command, git
revision, machine with its load average, settings, every figure, a headline for bench/RESULTS.md).

    python bench/load.py --clients 8 --duration 20 --max-batch 1,4
    python bench/load.py --clients 64 --duration 60 --max-batch 4 --max-queue 64 --json bench/results/serve_load_64.json
    python bench/load.py --fuzz 10000 --json bench/results/serve_fuzz_10000.json
    python bench/load.py --transport http --clients 8 --duration 20 --max-batch 4
    python bench/load.py --transport ray --fuzz 10000 --json bench/results/serve_fuzz_10000_ray.json
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

from cones2.serve import cones2_pb2 as pb
from cones2.serve.client import Client, HttpClient, HttpError, build_request
from harness.results import write_result

PROMPTS = ["a dog and a mug on the beach", "a dog on a table", "a mug and a dog in the snow", "a photo of a dog"]
FUZZ_LIMITS = {"max_message_bytes": 1 << 20, "max_layout_png_bytes": 256 << 10}   # over-limit cases stay cheap
FUZZ_RESIDUAL_BYTES = 64 << 10


def _png(ok: bool) -> bytes:
    if not ok:
        return b"\x89PNG\r\n\x1a\nnot really"
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _valid(rng: random.Random, steps: int, size: int) -> pb.GenerateRequest:
    x = rng.uniform(0.0, 0.4)
    return build_request(rng.choice(PROMPTS), boxes={"dog": (x, 0.2, x + 0.5, 0.9)}, seed=rng.randrange(2**31),
                         steps=steps, width=size, height=size)


MALFORMED = {
    "empty prompt": lambda s, z: build_request("", steps=s, width=z, height=z),
    "NaN cfg": lambda s, z: build_request("a dog", cfg_scale=float("nan"), steps=s, width=z, height=z),
    "negative weight -1e308": lambda s, z: build_request("a dog", negative_weight=-1e308, steps=s, width=z, height=z),
    "box outside": lambda s, z: build_request("a dog", boxes={"dog": (0.2, 0.2, 1.4, 0.9)}, steps=s, width=z, height=z),
    "box strength 1e308": lambda s, z: build_request("a dog", boxes={"dog": (0, 0, 1, 1)}, strengths={"dog": 1e308},
                                                     steps=s, width=z, height=z),
    "steps 0": lambda s, z: build_request("a dog", steps=0, width=z, height=z),
    "size 100": lambda s, z: build_request("a dog", steps=s, width=100, height=z),
    "bad png": lambda s, z: build_request("a dog", color_map=_png(False), color_table={"255,0,0": ("dog", 2.5)},
                                          steps=s, width=z, height=z),
    "colour not in map": lambda s, z: build_request("a dog", color_map=_png(True), color_table={"0,9,0": ("dog", 2)},
                                                    steps=s, width=z, height=z),
    "unknown residual": lambda s, z: build_request("a dog", {"dog": "f" * 64}, steps=s, width=z, height=z),
    "subject not in prompt": lambda s, z: build_request("a mug", boxes={"dog": (0, 0, 1, 1)}, steps=s, width=z, height=z),
    "bad residual bytes": lambda s, z: build_request("a dog", {"dog": b"junk"}, steps=s, width=z, height=z),
}


# ---- the server process -------------------------------------------------------------------------
class ServerProcess:
    """`cones2-engine serve` on 127.0.0.1 (`--transport ray`: `serve --ray`, its gRPC proxy on a free
    port of every interface, with a token); the resident memory of its process tree is sampled."""

    def __init__(self, args, max_batch: int, store: str, extra: list[str] = (), token: str | None = None):
        cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "serve",
               "--max-batch", str(max_batch), "--max-queue", str(args.max_queue), "--threads", str(args.threads),
               "--residual-store", store, "--log-level", "ERROR", *extra]
        self.token = token
        if args.transport == "ray":
            if token is None:                   # never an open port on every interface
                self.token = "load-" + os.urandom(8).hex()
                token_file = Path(store).parent / f"{Path(store).name}.token"
                token_file.write_text(self.token)
                cmd += ["--auth-token-file", str(token_file)]
            cmd += ["--ray", "--ray-grpc-every-interface", "--replicas", str(args.replicas), "--replica-cpus", "1",
                    "--port", str(_free_port()), "--http-port", str(_free_port())]
        else:
            cmd += ["--port", "0", "--http-port", "0"]
        if args.model:
            cmd += ["--model", args.model]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.output: list[str] = []             # what it printed (Ray forwards its workers' lines too)
        timer = threading.Timer(600, self.proc.kill)
        timer.start()
        match = None
        for line in self.proc.stdout:
            self.output.append(line)
            if match := re.search(r"SERVING on (\S+)", line):
                break
        timer.cancel()
        if not match:
            self.proc.kill()
            raise SystemExit(f"server did not start (last lines: {self.output[-5:]!r})")
        self.target = match.group(1).replace("[::]", "127.0.0.1")
        self.http = "http://127.0.0.1:" + re.search(r"HTTP/JSON on http://[^:]+:(\d+)", line).group(1)
        threading.Thread(target=self._drain, daemon=True).start()
        self.rss_start = self.rss_peak = _rss(self.proc.pid)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _drain(self) -> None:
        """Keep reading its stdout, so a full pipe never blocks the server."""
        for line in self.proc.stdout:
            self.output = self.output[-200:] + [line]

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.rss_peak = max(self.rss_peak, _rss(self.proc.pid))

    def finish(self) -> tuple[list[str], dict]:
        """Check it is alive and SERVING, SIGTERM it; (crash reasons, memory figures in MiB)."""
        crashed = []
        rss_end = _rss(self.proc.pid)
        if self.proc.poll() is not None:
            crashed.append(f"server exited with {self.proc.returncode} during the run")
        else:
            with Client(self.target, token=self.token) as c:
                if c.health() != "SERVING":
                    crashed.append("health is not SERVING after the run")
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=300)
        if code != 0:
            crashed.append(f"SIGTERM exit code {code}")
        mib = 1 << 20
        return crashed, {"rss_start_mib": round(self.rss_start / mib, 1), "rss_peak_mib": round(self.rss_peak / mib, 1),
                         "rss_end_mib": round(rss_end / mib, 1)}

    def kill(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


# ---- load mode ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    valid: bool
    code: str
    latency: float
    batch_size: int = 0


@dataclass
class RunResult:
    max_batch: int
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    memory: dict = field(default_factory=dict)

    def summary(self) -> dict:
        valid = [o for o in self.outcomes if o.valid]
        bad = [o for o in self.outcomes if not o.valid]
        ok = [o for o in valid if o.code == "OK"]
        lat = np.array([o.latency for o in ok]) * 1000 if ok else np.zeros(1)
        return {
            "max_batch": self.max_batch, "wall_s": round(self.wall, 2), "sent": len(self.outcomes),
            "valid": len(valid), "ok": len(ok),
            "rejected": sum(o.code == "RESOURCE_EXHAUSTED" for o in self.outcomes),
            "lost": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in valid),
            "malformed": len(bad), "invalid_argument": sum(o.code == "INVALID_ARGUMENT" for o in bad),
            # under overload gRPC may reject a malformed request before it is read: that is fine
            "misjudged": sum(o.code not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") for o in bad),
            "internal": sum(o.code == "INTERNAL" for o in self.outcomes),
            "errors": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT") for o in self.outcomes),
            "throughput": len(ok) / self.wall, "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99)),
            "mean_batch": float(np.mean([o.batch_size for o in ok])) if ok else 0.0,
            "crashes": len(self.crashed), "crash_reasons": list(self.crashed), **self.memory,
        }


def client_loop(server: ServerProcess, seed: int, args, deadline: float, out: list[Outcome], lock: threading.Lock,
                bar) -> None:
    rng = random.Random(seed)
    sent = 0
    with Client(server.target, token=server.token, timeout=args.timeout) as c:
        http = HttpClient(server.http, token=server.token, timeout=args.timeout)
        while time.monotonic() < deadline and (args.requests is None or sent < args.requests):
            valid = rng.random() >= args.invalid_fraction
            req = _valid(rng, args.steps, args.size) if valid else rng.choice(list(MALFORMED.values()))(args.steps,
                                                                                                        args.size)
            t0 = time.monotonic()
            try:
                r = (http.generate_request(req) if args.transport == "http" else
                     c.stub.Generate(req, timeout=args.timeout, metadata=c.metadata))
                o = Outcome(valid, "OK", time.monotonic() - t0, r.batch_size)
            except (grpc.RpcError, HttpError) as exc:
                code = exc.code if isinstance(exc, HttpError) else exc.code().name
                o = Outcome(valid, code, time.monotonic() - t0)
                if code == "RESOURCE_EXHAUSTED":
                    time.sleep(args.backoff)                # a polite client backs off when rejected
            sent += 1
            with lock:
                out.append(o)
                bar.update(1)


def run_load(args, max_batch: int) -> RunResult:
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(args, max_batch, store)
        try:
            with Client(server.target, token=server.token) as c:    # one untimed request so every run starts warm
                c.generate_request(_valid(random.Random(0), args.steps, args.size))
            outcomes: list[Outcome] = []
            lock = threading.Lock()
            start = time.monotonic()
            deadline = start + args.duration
            with tqdm(desc=f"max_batch {max_batch}", unit="req", disable=not args.progress) as bar:
                threads = [threading.Thread(target=client_loop, daemon=True,
                                            args=(server, 1000 * max_batch + i, args, deadline,
                                                  outcomes, lock,
                                                  bar)) for i in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():              # join in slices, so Ctrl-C stops the run
                        t.join(0.5)
            result = RunResult(max_batch, time.monotonic() - start, outcomes)
            result.crashed, result.memory = server.finish()
            return result
        finally:
            server.kill()


def load_main(args) -> tuple[int, dict]:
    rows = [run_load(args, int(b)).summary() for b in args.max_batch.split(",")]
    print(f"\nclients={args.clients} duration={args.duration:g}s steps={args.steps} size={args.size} "
          f"invalid_fraction={args.invalid_fraction} server --threads {args.threads} --max-queue {args.max_queue}")
    head = ("max_batch", "sent", "ok", "rejected", "lost", "malformed", "invalid_argument", "misjudged", "internal",
            "errors", "crashes", "throughput", "p50", "p95", "p99", "mean_batch", "rss_peak_mib")
    names = {"throughput": "valid req/s", "p50": "p50 ms", "p95": "p95 ms", "p99": "p99 ms",
             "rss_peak_mib": "server peak RSS MiB"}
    print("| " + " | ".join(names.get(h, h) for h in head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    by_batch: dict[int, list[dict]] = {}
    for r in rows:                       # repeated values (--max-batch 1,4,1,4) average out machine drift
        by_batch.setdefault(r["max_batch"], []).append(r)
    mean = {b: (float(np.mean([r["throughput"] for r in rs])), float(np.mean([r["p50"] for r in rs])))
            for b, rs in by_batch.items()}
    base = rows[0]["max_batch"]
    gains = {}
    for b, (tput, p50) in mean.items():
        if b != base and mean[base][0] > 0:
            gains[b] = tput / mean[base][0]
            print(f"batching gain: max_batch {b} vs {base}: {gains[b]:.2f}x throughput "
                  f"({tput:.2f} vs {mean[base][0]:.2f} valid req/s, mean of {len(by_batch[b])} and "
                  f"{len(by_batch[base])} runs), p50 latency {p50 / mean[base][1]:.2f}x")
    failed = [r for r in rows if r["crashes"] or r["lost"] or r["misjudged"] or r["errors"]]
    print("PASS: no crashes, no INTERNAL, no lost valid requests, no errors, every malformed request that was read "
          "got INVALID_ARGUMENT" if not failed else f"FAIL: {failed}")
    return (1 if failed else 0), {"runs": rows, "batching_gain": {str(b): g for b, g in gains.items()}}


# ---- fuzz mode ----------------------------------------------------------------------------------
def fuzz_main(args) -> tuple[int, dict]:
    from serve_fuzz import run_fuzz

    token = "fuzz-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        extra = ["--auth-token-file", str(token_file), "--max-message-bytes", str(FUZZ_LIMITS["max_message_bytes"]),
                 "--max-residual-bytes", str(FUZZ_RESIDUAL_BYTES),
                 "--max-layout-png-bytes", str(FUZZ_LIMITS["max_layout_png_bytes"])]
        server = ServerProcess(args, 4, str(Path(tmp) / "store"), extra, token=token)
        try:
            with Client(server.target, token=token, timeout=args.timeout) as c:     # warm
                c.generate_request(_valid(random.Random(0), 2, 64))
            report = run_fuzz(server.target, args.fuzz, seed=args.seed, clients=args.clients, token=token,
                              timeout=args.timeout, progress=args.progress,
                              http=server.http if args.transport == "http" else None, **FUZZ_LIMITS)
            crashed, memory = server.finish()
        finally:
            server.kill()
    summary = report.summary() | {"lost_valid": report.valid - report.valid_ok, "crashes": len(crashed),
                                  "crash_reasons": crashed, **memory, "cases_by_kind": dict(sorted(report.kinds.items()))}
    print(f"\nfuzz over {args.transport}: {args.fuzz} cases, seed {args.seed}, {args.clients} clients, "
          f"server --threads {args.threads}")
    for key in ("sent", "valid", "valid_ok", "lost_valid", "malformed", "internal", "failures", "crashes", "codes",
                "kinds", "longest_details_chars", "seconds", "requests_per_second", "rss_start_mib", "rss_peak_mib",
                "rss_end_mib"):
        print(f"  {key}: {summary[key]}")
    for f in summary["first_failures"]:
        print(f"  failure: {f}")
    unsent = args.fuzz - summary["sent"]          # a client thread that died leaves cases unsent
    failed = summary["failures"] or summary["internal"] or summary["crashes"] or summary["lost_valid"] or unsent
    print("PASS: every case got its documented code, no INTERNAL, no lost valid request, no crash" if not failed
          else f"FAIL{f' ({unsent} cases never sent)' if unsent else ''}")
    return (1 if failed else 0), {"fuzz": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    p.add_argument("--requests", type=int, default=None, help="stop each client after this many requests")
    p.add_argument("--max-batch", default="1,4",
                   help="comma-separated --max-batch values, one run each, in order (repeat values to interleave)")
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--invalid-fraction", type=float, default=0.2, help="share of malformed requests")
    p.add_argument("--timeout", type=float, default=120.0, help="client deadline per request")
    p.add_argument("--backoff", type=float, default=0.05, help="seconds a client waits after a rejection")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (default: %(default)s)")
    p.add_argument("--model", default=None, help="model dir (default: the embedded tiny model)")
    p.add_argument("--fuzz", type=int, default=None, metavar="N", help="fuzz mode: send N seeded hostile cases")
    p.add_argument("--seed", type=int, default=0, help="fuzz seed")
    p.add_argument("--transport", choices=["grpc", "http", "ray"], default="grpc",
                   help="what the clients talk to: the in-process server's gRPC or HTTP/JSON, or `serve --ray`'s "
                        "gRPC proxy (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas with --transport ray (default: %(default)s)")
    p.add_argument("--json", default=None, help="write a results record (bench/harness/results.py) here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)

    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%S"), [round(x, 2) for x in os.getloadavg()]
    try:
        code, results = fuzz_main(args) if args.fuzz is not None else load_main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        payload = {"started": started, "loadavg_at_start": load_start, "passed": code == 0, "versions": _versions(),
                   **results}
        write_result(args.json, vars(args), payload, argv=argv, script="bench/load.py",
                     summaries=[_headline(args, code == 0, results)])
        print(f"wrote {args.json}")
    return code


def _headline(args, passed: bool, results: dict) -> dict:
    """The record's row in bench/RESULTS.md: what was checked, and the loaded throughput as such."""
    where = {"grpc": "in-process gRPC", "http": "in-process HTTP/JSON",
             "ray": f"Ray Serve gRPC proxy, {args.replicas} replicas"}[args.transport]
    verdict = "PASS" if passed else "FAIL"
    if args.fuzz is not None:
        f = results["fuzz"]
        text = (f"{verdict}: {f['sent']} fuzz cases, {f['failures']} unexpected answers, {f['internal']} INTERNAL, "
                f"{f['lost_valid']} of {f['valid']} valid lost, {f['crashes']} crashes; {f['requests_per_second']} "
                f"cases/s on a loaded machine; server RSS peak {f['rss_peak_mib']} MiB")
    else:
        r = results["runs"][-1]
        text = (f"{verdict}: {args.clients} clients for {args.duration:g} s: {r['sent']} sent, {r['ok']} valid OK, "
                f"{r['lost']} lost, {r['misjudged']} misjudged, {r['internal']} INTERNAL, {r['crashes']} crashes; "
                f"{r['throughput']:.2f} valid req/s (loaded machine), mean batch {r['mean_batch']:.2f}")
    return {"area": f"serving, {where}", "headline": text, "details": "serve.md"}


def _versions() -> dict:
    import torch

    found = {"torch": torch.__version__, "grpcio": grpc.__version__}
    try:
        import ray

        found["ray"] = ray.__version__
    except ImportError:
        pass
    return found


if __name__ == "__main__":
    sys.exit(main())
