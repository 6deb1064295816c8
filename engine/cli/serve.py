"""`cones2-engine serve`: run the gRPC service (cones2.v1.Cones2Service + health + reflection).

SIGTERM or Ctrl-C: stop accepting, finish in-flight requests (up to --grace seconds), exit 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from ..errors import Cones2Error
from .common import add_model_flags, load_engine


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC service", description=__doc__)
    add_model_flags(p)
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
    p.add_argument("--max-message-bytes", type=int, default=32 << 20,
                   help="largest gRPC message; gRPC rejects larger ones with RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key) to serve TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--auth-token-file", help="file holding a bearer token clients must send")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity (default: %(default)s)")
    # Test hook (hidden from --help): sleep after every sampling step so tiny models are slow.
    p.add_argument("--test-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..serve.auth import read_token_file
    from ..serve.server import ServeOptions, Server
    from ..serve.validation import Limits

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Cones2Error("give both --tls-cert and --tls-key, or neither", "--tls-cert")
    options = ServeOptions(
        host=args.host, port=args.port, residual_store=args.residual_store, max_queue=args.max_queue,
        max_batch=args.max_batch, workers=args.workers,
        limits=Limits(max_subjects=args.max_subjects, max_resolution=args.max_resolution, max_steps=args.max_steps,
                      max_residual_bytes=args.max_residual_bytes),
        max_message_bytes=args.max_message_bytes,
        tls_cert=_read(args.tls_cert, "--tls-cert"), tls_key=_read(args.tls_key, "--tls-key"),
        auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
        metrics_port=args.metrics_port, grace_seconds=args.grace, step_delay=args.test_step_delay)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(lambda: load_engine(args), options).start()
    try:
        while not server.wait_ready(0.2):
            if stop.is_set():
                server.stop(grace=0)
                return 0
    except BaseException:
        server.stop(grace=0)
        raise
    metrics = f", metrics on http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"cones2-engine serve: SERVING on {server.address}{metrics}", flush=True)
    while not stop.wait(0.5):
        pass
    print(f"cones2-engine serve: stopping (grace {args.grace:g}s)", file=sys.stderr, flush=True)
    server.stop()
    return 0


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Cones2Error(f"cannot read {path}: {exc}", flag) from None
