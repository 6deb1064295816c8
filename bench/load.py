"""Load test for `cones2-engine serve`: N concurrent clients against a server this script starts on
127.0.0.1 (a subprocess; embedded tiny model on CPU unless --model), once per --max-batch value.

Each client thread sends a mix of valid and malformed requests for --duration seconds (or
--requests each). Printed per run: throughput of valid requests, p50/p95/p99 latency of valid
requests, rejections (RESOURCE_EXHAUSTED), malformed requests answered INVALID_ARGUMENT, errors,
mean batch size. The run fails (exit 1) on any crash (server process gone, health not SERVING,
SIGTERM exit code != 0), any lost valid request (neither a result nor a rejection), any error, or
any malformed request answered other than INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when overloaded).
The last lines compare throughput with and without cross-request batching.

    python bench/load.py --clients 8 --duration 20 --max-batch 1,4
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from cones2.serve.client import Client, build_request
from cones2.serve import cones2_pb2 as pb

PROMPTS = ["a dog and a mug on the beach", "a dog on a table", "a mug and a dog in the snow", "a photo of a dog"]


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
    "box outside": lambda s, z: build_request("a dog", boxes={"dog": (0.2, 0.2, 1.4, 0.9)}, steps=s, width=z, height=z),
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

    def summary(self) -> dict:
        valid = [o for o in self.outcomes if o.valid]
        bad = [o for o in self.outcomes if not o.valid]
        ok = [o for o in valid if o.code == "OK"]
        lat = np.array([o.latency for o in ok]) * 1000 if ok else np.zeros(1)
        return {
            "max_batch": self.max_batch, "sent": len(self.outcomes), "valid": len(valid), "ok": len(ok),
            "rejected": sum(o.code == "RESOURCE_EXHAUSTED" for o in self.outcomes),
            "lost": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in valid),
            "malformed": len(bad), "invalid_argument": sum(o.code == "INVALID_ARGUMENT" for o in bad),
            # under overload gRPC may reject a malformed request before it is read: that is fine
            "misjudged": sum(o.code not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") for o in bad),
            "errors": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT") for o in self.outcomes),
            "throughput": len(ok) / self.wall, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "mean_batch": float(np.mean([o.batch_size for o in ok])) if ok else 0.0,
            "crashes": len(self.crashed), "crash_reasons": list(self.crashed),
        }


def start_server(args, max_batch: int, store: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "serve",
           "--port", "0", "--max-batch", str(max_batch), "--max-queue", str(args.max_queue),
           "--residual-store", store, "--log-level", "WARNING"]
    if args.model:
        cmd += ["--model", args.model]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(300, proc.kill)
    timer.start()
    line = proc.stdout.readline()
    timer.cancel()
    match = re.search(r"SERVING on (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start (got {line!r})")
    return proc, match.group(1)


def client_loop(target: str, seed: int, args, deadline: float, out: list[Outcome], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    sent = 0
    with Client(target, timeout=args.timeout) as c:
        while time.monotonic() < deadline and (args.requests is None or sent < args.requests):
            valid = rng.random() >= args.invalid_fraction
            req = _valid(rng, args.steps, args.size) if valid else rng.choice(list(MALFORMED.values()))(args.steps,
                                                                                                        args.size)
            t0 = time.monotonic()
            try:
                r = c.stub.Generate(req, timeout=args.timeout)
                o = Outcome(valid, "OK", time.monotonic() - t0, r.batch_size)
            except grpc.RpcError as exc:
                o = Outcome(valid, exc.code().name, time.monotonic() - t0)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(args.backoff)                # a polite client backs off when rejected
            sent += 1
            with lock:
                out.append(o)


def run_once(args, max_batch: int) -> RunResult:
    with tempfile.TemporaryDirectory() as store:
        proc, target = start_server(args, max_batch, store)
        try:
            with Client(target) as c:                     # one untimed request so both runs start warm
                c.generate_request(_valid(random.Random(0), args.steps, args.size))
            outcomes: list[Outcome] = []
            lock = threading.Lock()
            start = time.monotonic()
            deadline = start + args.duration
            threads = [threading.Thread(target=client_loop, args=(target, 1000 * max_batch + i, args, deadline,
                                                                  outcomes, lock)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result = RunResult(max_batch, time.monotonic() - start, outcomes)
            if proc.poll() is not None:
                result.crashed.append(f"server exited with {proc.returncode} during the run")
            else:
                with Client(target) as c:
                    if c.health() != "SERVING":
                        result.crashed.append("health is not SERVING after the run")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            if code != 0:
                result.crashed.append(f"SIGTERM exit code {code}")
            return result
        finally:
            if proc.poll() is None:
                proc.kill()


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
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--model", default=None, help="model dir (default: the embedded tiny model)")
    args = p.parse_args(argv)

    rows = [run_once(args, int(b)).summary() for b in args.max_batch.split(",")]
    print(f"\nclients={args.clients} duration={args.duration:g}s steps={args.steps} size={args.size} "
          f"invalid_fraction={args.invalid_fraction} server OMP_NUM_THREADS={args.threads}")
    head = ("max_batch", "sent", "ok", "rejected", "lost", "malformed", "invalid_argument", "misjudged", "errors",
            "crashes",
            "throughput", "p50", "p95", "p99", "mean_batch")
    print("| " + " | ".join(h if h not in ("throughput", "p50", "p95", "p99") else
                            {"throughput": "valid req/s", "p50": "p50 ms", "p95": "p95 ms", "p99": "p99 ms"}[h]
                            for h in head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    by_batch: dict[int, list[dict]] = {}
    for r in rows:                       # repeated values (--max-batch 1,4,1,4) average out machine drift
        by_batch.setdefault(r["max_batch"], []).append(r)
    mean = {b: (float(np.mean([r["throughput"] for r in rs])), float(np.mean([r["p50"] for r in rs])))
            for b, rs in by_batch.items()}
    base = rows[0]["max_batch"]
    for b, (tput, p50) in mean.items():
        if b != base and mean[base][0] > 0:
            print(f"batching gain: max_batch {b} vs {base}: {tput / mean[base][0]:.2f}x throughput "
                  f"({tput:.2f} vs {mean[base][0]:.2f} valid req/s, mean of {len(by_batch[b])} and "
                  f"{len(by_batch[base])} runs), p50 latency {p50 / mean[base][1]:.2f}x")
    failed = [r for r in rows if r["crashes"] or r["lost"] or r["misjudged"] or r["errors"]]
    print("PASS: no crashes, no lost valid requests, no errors, every malformed request that was read got "
          "INVALID_ARGUMENT" if not failed
          else f"FAIL: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
