"""`cones2-engine serve`: run cones2.v1.Cones2Service over gRPC (+ health, reflection), and over
HTTP/JSON with --http-port; with --ray, on Ray Serve's proxies instead.

SIGTERM or Ctrl-C: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight requests get up to
--grace seconds to finish (the port stays open meanwhile), then the port closes and it exits 0.
Every port listens on --host only; beyond loopback a token is required unless
--allow-unauthenticated-network says otherwise. Threads: each worker runs one engine; torch's
--threads are one pool shared by all workers, so keep workers x threads at or below the cores.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from ..errors import Cones2Error, quote
from ..threads import configure_threads
from .common import add_model_flags, add_threads_flag, backend_choice, check_model_flags, load_engine

# Flags of the in-process server that have no meaning under Ray Serve: (attribute, default, why).
_NOT_WITH_RAY = (("workers", 1, "use --replicas (one replica per GPU)"),
                 ("tls_cert", None, "Ray Serve's gRPC proxy serves plaintext; terminate TLS in front of it"),
                 ("metrics_port", None, "Ray exports Ray Serve's metrics itself (docs/serve.md)"))


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC service", description=__doc__)
    add_model_flags(p)
    add_threads_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, 0.0.0.0 for all interfaces (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port, 0 = any free port (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the HTTP/JSON API on --host at this port, 0 = any free port (default: off; "
                        "docs/serve.md)")
    p.add_argument("--allow-unauthenticated-network", action="store_true",
                   help="listen beyond loopback without --auth-token-file (refused otherwise)")
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
                   help="serve through Ray Serve: engine replicas behind its gRPC proxy on --port")
    r.add_argument("--ray-grpc-every-interface", action="store_true",
                   help="accept that Ray Serve's gRPC proxy listens on every interface whatever --host says "
                        "(without it, --ray refuses to start)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (this node's, after `ray start`) or HOST:6379 (default: a local Ray)")
    r.add_argument("--replicas", type=int, default=1,
                   help="engine replicas, one per GPU with --device cuda (default: %(default)s); the starting "
                        "count with --min/--max-replicas")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (with --min-replicas)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default: %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..serve.auth import check_exposure

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = _token(args)
    if args.ray and not args.ray_grpc_every_interface:
        raise Cones2Error("Ray Serve's gRPC proxy listens on every interface whatever --host says; pass "
                          "--ray-grpc-every-interface to accept that, or serve without --ray", "host")
    check_exposure(args.host, token, allow_unauthenticated=args.allow_unauthenticated_network,
                   every_interface=args.ray)
    if args.ray:   # engine replicas on a Ray cluster (cones2.serve.ray); CUDA is checked on the replicas
        return _run_ray(args, token, check_model_flags(args) if args.device == "cpu" else None)
    from ..serve.server import ServeOptions, Server

    if bool(args.tls_cert) != bool(args.tls_key):
        raise Cones2Error("give both --tls-cert and --tls-key, or neither", "tls-cert")
    threads = configure_threads(args.threads)
    checked = check_model_flags(args)              # a bad device/dtype/backend answers before loading
    options = ServeOptions(
        host=args.host, port=args.port, http_port=args.http_port, residual_store=args.residual_store,
        max_queue=args.max_queue, max_batch=args.max_batch, workers=args.workers, limits=limits_from_args(args),
        max_message_bytes=args.max_message_bytes,
        tls_cert=_read(args.tls_cert, "tls-cert"), tls_key=_read(args.tls_key, "tls-key"), auth_token=token,
        metrics_port=args.metrics_port, grace_seconds=args.grace, **_warmup(args))
    server = Server(lambda: load_engine(args, checked), options)

    def banner() -> str:
        extra = "".join(f", {what} on {_url(args.host, port)}{path}" for what, port, path in
                        (("HTTP/JSON", server.http_port, "/v1"), ("studio", server.http_port, "/"),
                         ("metrics", server.metrics_port, "/metrics")) if port)
        return f"SERVING on {server.address} ({args.workers} worker(s), {threads} torch thread(s){extra})"

    return serve_until_signal(server.start, lambda: server.wait_ready(0.2), server.stop, banner, args.grace)


def serve_until_signal(start, ready, stop, banner, grace: float) -> int:
    """The serve loop (in-process and Ray alike): start, wait until ready (a signal meanwhile stops
    at once), print the banner, run until SIGTERM / Ctrl-C, then drain for up to `grace` seconds."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    start()
    try:
        while not ready():
            if stopping.is_set():
                stop(grace=0)
                return 0
    except BaseException:
        stop(grace=0)
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):   # ray.init may have installed its own
        signal.signal(sig, lambda *_: stopping.set())
    print(f"cones2-engine serve: {banner()}", flush=True)
    while not stopping.wait(0.5):
        pass
    print(f"cones2-engine serve: stopping (grace {grace:g}s)", file=sys.stderr, flush=True)
    stop()
    return 0


def ray_options_from_args(args, token: str | None, checked: dict | None):
    """The serve flags -> (RayServeOptions, EngineSpec) of cones2.serve.ray."""
    from ..serve.ray.app import RayServeOptions
    from ..serve.ray.app import EngineSpec

    for name, default, hint in _NOT_WITH_RAY:
        if getattr(args, name, default) != default:
            raise Cones2Error(f"not available with --ray: {hint}", name.replace("_", "-"))
    if args.port == 0:
        raise Cones2Error("give a port: Ray Serve's gRPC proxy listens on one fixed port on every node", "port")
    options = RayServeOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        replica_cpus=args.replica_cpus, residual_store=args.residual_store, limits=limits_from_args(args),
        max_batch=args.max_batch, max_queue=args.max_queue, grpc_port=args.port, http_port=args.http_port,
        host=args.host, address=args.address, auth_token=token, grace_seconds=args.grace,
        max_message_bytes=args.max_message_bytes)
    if checked is None:   # the head node may lack the replicas' device: the registry checks all but that
        backend, backend_options = backend_choice(args)
        checked = {"device": args.device, "dtype": args.dtype, "backend": backend,
                   "backend_options": backend_options, "compile": bool(getattr(args, "compile", False))}
    spec = EngineSpec(model=args.model, device=str(checked["device"]), dtype=checked["dtype"],
                      backend=checked["backend"], backend_options=dict(checked["backend_options"]),
                      compile=bool(checked.get("compile", False)), threads=args.threads, **_warmup(args))
    return options, spec


def _run_ray(args, token: str | None, checked: dict | None) -> int:
    from ..serve.ray.app import RayService

    options, spec = ray_options_from_args(args, token, checked)
    service = RayService(options, spec)
    scale = (f"{options.min_replicas}..{options.max_replicas} replicas (autoscaling, {options.replicas} at start)"
             if options.autoscaling else f"{options.replicas} replica(s)")
    web = _url(options.host, options.http_port)
    http = f", HTTP/JSON on {web}/v1, studio on {web}/" if options.http_port else ""
    device = "1 GPU" if spec.device.startswith("cuda") else f"{options.replica_cpus:g} CPU"
    banner = (f"SERVING on [::]:{options.grpc_port} (every interface) via Ray Serve ({scale}, {device} each{http})")
    return serve_until_signal(service.start, lambda: True, service.stop, lambda: banner, options.grace_seconds)


def _url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _token(args) -> str | None:
    from ..serve.auth import read_token_file

    return read_token_file(args.auth_token_file) if args.auth_token_file else None


def limits_from_args(args):
    """The per-request `Limits` of the serve flags (the in-process server and Ray Serve alike)."""
    from ..serve.validation import Limits

    layout = {k: getattr(args, k) for k in ("max_layout_pixels", "max_layout_png_bytes") if getattr(args, k) is not None}
    return Limits(max_subjects=args.max_subjects, max_resolution=args.max_resolution, max_steps=args.max_steps,
                  max_residual_bytes=args.max_residual_bytes, **layout)


def _warmup(args) -> dict:
    """--warmup-resolution / --warmup-batch-sizes -> the warm-up fields both option types share."""
    return {"warmup_resolutions": tuple(_size(v) for v in args.warmup_resolution),
            "warmup_batch_sizes": _batch_sizes(args.warmup_batch_sizes, args.max_batch)}


def _size(text: str) -> tuple[int, int]:
    """--warmup-resolution: "768" or "768x512" (height x width), multiples of 64."""
    try:
        sides = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or any(s < 64 or s % 64 for s in sides):
        raise Cones2Error(f"expected SIZE or HxW in multiples of 64, got {text!r}", "warmup-resolution")
    return (sides[0], sides[-1])


def _batch_sizes(text: str | None, max_batch: int) -> tuple[int, ...]:
    """--warmup-batch-sizes: "1,2,4", each in [1, --max-batch]."""
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
