"""`cones2-engine serve`: run the gRPC service (cones2.v1.Cones2Service + health + reflection).

SIGTERM or Ctrl-C: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight requests get up to
--grace seconds to finish (the port stays open meanwhile), then the port closes and it exits 0.
Threads: each worker runs one engine; torch's --threads are one pool shared by all workers, so keep
workers x threads at or below the cores (docs/serve.md).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from ..errors import Cones2Error, quote
from ..threads import configure_threads
from .common import add_model_flags, add_threads_flag, check_model_flags, load_engine


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC service", description=__doc__)
    add_model_flags(p)
    add_threads_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, 0.0.0.0 for all interfaces (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port, 0 = any free port (default: %(default)s)")
    p.add_argument("--residual-store", default=None,
                   help="folder of registered residuals (default: <cache>/cones2-engine/residuals)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=4, help="compatible requests sampled together (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="engine workers, each with its own copy of the model; 1 per device (default: %(default)s)")
    p.add_argument("--max-resolution", type=int, default=1024, help="largest width/height accepted (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampling steps accepted (default: %(default)s)")
    p.add_argument("--max-subjects", type=int, default=8, help="most subjects per request (default: %(default)s)")
    p.add_argument("--max-residual-bytes", type=int, default=1 << 20, help="largest residual upload in bytes (default: %(default)s)")
    p.add_argument("--max-layout-pixels", type=int, default=None,
                   help="largest colour map, width x height, read from its header before decoding "
                        "(default: 4194304 = 2048x2048)")
    p.add_argument("--max-layout-png-bytes", type=int, default=None,
                   help="largest colour-map PNG file in bytes (default: 4194304)")
    p.add_argument("--max-message-bytes", type=int, default=32 << 20,
                   help="largest gRPC message; gRPC rejects larger ones with RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key) to serve TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--auth-token-file", help="file holding a bearer token clients must send")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown (default: %(default)s)")
    p.add_argument("--warmup-resolution", action="append", default=[], metavar="SIZE|HxW",
                   help="a size every worker compiles before SERVING (Engine.warmup); repeatable "
                        "(default: a 64-px smoke run; with --compile, the model's resolution)")
    p.add_argument("--warmup-batch-sizes", default=None, metavar="N[,N]",
                   help="batch sizes warmed per --warmup-resolution (default: 1..--max-batch)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity (default: %(default)s)")
    r = p.add_argument_group("Ray Serve (--ray; needs the ray extra, docs/serve.md)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: engine replicas behind its gRPC proxy on --port (every interface)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (this node's, after `ray start`) or HOST:6379 (default: a local Ray)")
    r.add_argument("--replicas", type=int, default=1,
                   help="engine replicas, one per GPU with --device cuda (default: %(default)s); the starting "
                        "count with --min/--max-replicas")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (with --min-replicas)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default: %(default)s)")
    r.add_argument("--http-port", type=int, default=8000,
                   help="Ray Serve's HTTP proxy (JSON) on --host (default: %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..serve.auth import read_token_file
    from ..serve.server import ServeOptions, Server

    if args.ray:   # engine replicas on a Ray cluster (cones2.serve.ray); CUDA is checked on the replicas
        from ..serve.ray.cli import run as run_ray

        return run_ray(args, limits_from_args(args), check_model_flags(args) if args.device == "cpu" else None)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Cones2Error("give both --tls-cert and --tls-key, or neither", "tls-cert")
    threads = configure_threads(args.threads)
    checked = check_model_flags(args)              # a bad device/dtype/backend answers before loading
    options = ServeOptions(
        host=args.host, port=args.port, residual_store=args.residual_store, max_queue=args.max_queue,
        max_batch=args.max_batch, workers=args.workers, limits=limits_from_args(args),
        max_message_bytes=args.max_message_bytes,
        tls_cert=_read(args.tls_cert, "tls-cert"), tls_key=_read(args.tls_key, "tls-key"),
        auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
        metrics_port=args.metrics_port, grace_seconds=args.grace,
        warmup_resolutions=tuple(_size(v) for v in args.warmup_resolution),
        warmup_batch_sizes=_batch_sizes(args.warmup_batch_sizes, args.max_batch))

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(lambda: load_engine(args, checked), options).start()
    try:
        while not server.wait_ready(0.2):
            if stop.is_set():
                server.stop(grace=0)
                return 0
    except BaseException:
        server.stop(grace=0)
        raise
    metrics = f", metrics on http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"cones2-engine serve: SERVING on {server.address} ({args.workers} worker(s), {threads} torch "
          f"thread(s){metrics})", flush=True)
    while not stop.wait(0.5):
        pass
    print(f"cones2-engine serve: stopping (grace {args.grace:g}s)", file=sys.stderr, flush=True)
    server.stop()
    return 0


def limits_from_args(args):
    """The per-request `Limits` of the serve flags (the in-process server and Ray Serve alike)."""
    from ..serve.validation import Limits

    layout = {k: getattr(args, k) for k in ("max_layout_pixels", "max_layout_png_bytes") if getattr(args, k) is not None}
    return Limits(max_subjects=args.max_subjects, max_resolution=args.max_resolution, max_steps=args.max_steps,
                  max_residual_bytes=args.max_residual_bytes, **layout)


def _size(text: str) -> tuple[int, int]:
    """--warmup-resolution: "768" or "768x512" (height x width), multiples of 64."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or any(s < 64 or s % 64 for s in sides):
        raise Cones2Error(f"expected SIZE or HxW in multiples of 64, got {text!r}", "warmup-resolution")
    return (sides[0], sides[-1])


def _batch_sizes(text: str | None, max_batch: int) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(not 1 <= b <= max_batch for b in sizes):
        raise Cones2Error(f"expected comma-separated batch sizes in [1, {max_batch}], got {text!r}",
                          "warmup-batch-sizes")
    return sizes


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Cones2Error(f"cannot read {quote(path)} ({exc.strerror or exc})", flag) from None
