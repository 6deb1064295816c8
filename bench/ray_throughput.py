"""Throughput of `cones2.serve.ray` with 1 and 2 engine replicas under the same load, in one run.

Starts one local Ray instance (`--num-cpus`, default: every core), Serve's gRPC proxy on 127.0.0.1,
and for each `--replicas` value deploys the application (CPU replicas reserving `--replica-cpus`
each; the embedded demo model unless `--model`), warms it up, then runs `--clients` closed-loop
client threads for `--duration` seconds with the same request stream (same prompts, boxes, seeds,
steps and size). Reports completed requests per second, latency percentiles, the batch sizes
each replica's serving core formed, how the requests spread over the replicas, and errors (any error
fails the run: exit 1). Writes a results record (`--json`, bench/harness/results.py: command, git
revision, machine with its load average, settings, payload). Bounded: it stops by itself.

    python bench/ray_throughput.py --replicas 1,2 --clients 8 --duration 20 --steps 10
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import grpc  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402

import cones2  # noqa: E402
from cones2.serve.client import Client, build_request  # noqa: E402
from cones2.serve.ray import APP_NAME, REPLICA_METADATA, EngineSpec, RayServeOptions, build_app  # noqa: E402
from cones2.serve.ray.app import GRPC_SERVICER_FUNCTIONS  # noqa: E402
from harness.results import write_result  # noqa: E402

PROMPTS = [("a star and a blue ring on a sand background", "star"), ("a green heart on a snow background", "heart"),
           ("a red circle and a star on a night background", "circle"), ("a blue ring on a stone background", "ring")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(i: int, steps: int, size: int):
    prompt, word = PROMPTS[i % len(PROMPTS)]
    x = 0.05 + 0.1 * (i % 4)
    return build_request(prompt, boxes={word: (x, 0.1, x + 0.5, 0.8)}, seed=i, steps=steps, width=size, height=size)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_load(target: str, clients: int, duration: float, steps: int, size: int) -> dict:
    """`clients` threads, each sending the next request of one shared stream as soon as the last is
    answered, for `duration` seconds; requests still running at the end are waited for and counted."""
    lock = threading.Lock()
    counter = iter(range(10**9))
    latencies, batches, replicas, errors = [], Counter(), Counter(), Counter()
    stop_at = time.monotonic() + duration

    def client_thread():
        with Client(target, timeout=300) as c:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter)
                start = time.monotonic()
                try:
                    resp, call = c.stub.Generate.with_call(_request(i, steps, size), timeout=300)
                except grpc.RpcError as exc:
                    with lock:
                        errors[exc.code().name] += 1
                    continue
                with lock:
                    latencies.append(time.monotonic() - start)
                    batches[resp.batch_size] += 1
                    replicas[dict(call.trailing_metadata()).get(REPLICA_METADATA, "?")] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 600)
    wall = time.monotonic() - start
    n = len(latencies)
    return {"requests": n, "wall_s": round(wall, 2), "throughput_rps": round(n / wall, 3),
            "latency_s": {"p50": round(_percentile(latencies, 0.5), 3), "p95": round(_percentile(latencies, 0.95), 3),
                          "max": round(max(latencies), 3), "mean": round(statistics.fmean(latencies), 3)}
            if n else None,
            "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
            "mean_batch": round(sum(k * v for k, v in batches.items()) / max(1, n), 2),
            "per_replica": dict(replicas), "errors": dict(errors)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2", help="replica counts to measure, in order (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per replica count")
    ap.add_argument("--warmup", type=int, default=8, help="requests sent before measuring (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: every core)")
    ap.add_argument("--json", default="bench/results/ray_throughput.json")
    args = ap.parse_args()
    counts = [int(v) for v in args.replicas.split(",")]

    grpc_port, http_port = _free_port(), _free_port()
    store_dir = tempfile.TemporaryDirectory(prefix="cones2-ray-bench-")
    store = store_dir.name
    spec = EngineSpec(model=args.model, backend=args.backend)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, namespace="cones2", _node_ip_address="127.0.0.1",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    print(f"ray + serve started in {time.monotonic() - t0:.1f}s ({ray.cluster_resources().get('CPU')} CPUs)",
          flush=True)
    runs, failed = [], False
    try:
        for n in counts:
            options = RayServeOptions(replicas=n, replica_cpus=args.replica_cpus, residual_store=store,
                                      max_batch=args.max_batch, grpc_port=grpc_port, http_port=http_port)
            t = time.monotonic()
            serve.run(build_app(options, spec), name=APP_NAME, route_prefix="/")
            deploy_s = time.monotonic() - t
            target = f"127.0.0.1:{grpc_port}"
            with Client(target, timeout=300) as c:
                c.wait_until_serving(120)
                for i in range(args.warmup):        # every replica sees a few requests before measuring
                    c.generate_request(_request(10**8 + i, args.steps, args.size))
            result = run_load(target, args.clients, args.duration, args.steps, args.size)
            result |= {"replicas": n, "deploy_s": round(deploy_s, 1), "loadavg_after": os.getloadavg()}
            runs.append(result)
            lat = result["latency_s"] or {}
            print(f"replicas={n}: {result['requests']} requests in {result['wall_s']}s = "
                  f"{result['throughput_rps']} req/s; latency p50 {lat.get('p50')}s p95 {lat.get('p95')}s; "
                  f"mean batch {result['mean_batch']}; per replica {sorted(result['per_replica'].values())}; "
                  f"errors {result['errors']}", flush=True)
            failed |= bool(result["errors"]) or not result["requests"]
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
        store_dir.cleanup()
    # Repeated counts (--replicas 1,2,1,2) are averaged; each round's own ratio is kept too, since
    # the machine's background load drifts between rounds.
    by_count = {n: [r["throughput_rps"] for r in runs if r["replicas"] == n] for n in dict.fromkeys(counts)}
    mean_rps = {n: round(statistics.fmean(v), 3) for n, v in by_count.items() if v}
    base = mean_rps.get(1)
    summary = {"throughput_rps_by_replicas": {str(n): v for n, v in by_count.items()},
               "mean_throughput_rps": {str(n): v for n, v in mean_rps.items()},
               "speedup_vs_1_replica": {str(n): round(v / base, 2) for n, v in mean_rps.items()} if base else None,
               "round_ratios_2_vs_1": [round(b["throughput_rps"] / a["throughput_rps"], 2)
                                       for a, b in zip(runs, runs[1:]) if a["replicas"] == 1 and b["replicas"] == 2]}
    payload = {
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "cones2": cones2.__version__},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "load": {"clients": args.clients, "duration_s": args.duration, "steps": args.steps, "size": args.size,
                 "model": args.model or "embedded demo model", "max_batch": args.max_batch,
                 "replica_cpus": args.replica_cpus, "closed_loop": True},
        "runs": runs,
        "summary": summary,
    }
    mean = summary["mean_throughput_rps"]
    headline = (f"{'PASS' if not failed else 'FAIL'}: {', '.join(f'{n} replica(s) {v} req/s' for n, v in mean.items())} "
                f"(speedup {summary['speedup_vs_1_replica']}); {sum(r['requests'] for r in runs)} requests, errors "
                f"{[r['errors'] for r in runs]}; one 2-core machine, loaded: not a scaling figure")
    write_result(args.json, vars(args), payload, script="bench/ray_throughput.py",
                 summaries=[{"area": "serving, Ray Serve replicas", "headline": headline, "details": "serve.md"}])
    print(f"wrote {args.json}; mean req/s by replicas {summary['mean_throughput_rps']}, "
          f"speedup {summary['speedup_vs_1_replica']}, per-round 2 vs 1: {summary['round_ratios_2_vs_1']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
