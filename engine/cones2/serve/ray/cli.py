"""`cones2-engine serve --ray`: the `serve` flags -> `RayService`, run until SIGTERM / Ctrl-C.

Called by `cones2.cli.serve` with the parsed flags (and the checked model flags when the device
can be checked here: a CUDA deployment's head node may have no GPU, its replicas check on theirs).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

from ... import Cones2Error
from ..auth import read_token_file
from ..validation import Limits
from .app import RayServeOptions, RayService
from .deployment import EngineSpec

log = logging.getLogger(__name__)

# Flags of the in-process server that have no meaning under Ray Serve.
_UNSUPPORTED = (("workers", 1, "use --replicas (one replica per GPU)"),
                ("tls_cert", None, "Ray Serve's gRPC proxy serves plaintext; terminate TLS in front of it"),
                ("metrics_port", None, "Ray exports Ray Serve's metrics itself (docs/serve.md)"))


def options_from_args(args, limits: Limits, checked: dict | None) -> tuple[RayServeOptions, EngineSpec]:
    for name, default, hint in _UNSUPPORTED:
        if getattr(args, name, default) != default:
            raise Cones2Error(f"not available with --ray: {hint}", name.replace("_", "-"))
    options = RayServeOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        replica_cpus=args.replica_cpus, residual_store=args.residual_store, limits=limits, max_batch=args.max_batch,
        max_queue=args.max_queue, grpc_port=args.port, http_port=args.http_port, host=args.host, address=args.address,
        auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
        grace_seconds=args.grace, max_message_bytes=args.max_message_bytes)
    if checked is None:
        backend_options = {k: v for k, v in (("onnx_dir", args.onnx), ("engine_dir", args.trt)) if v}
        checked = {"device": args.device, "dtype": args.dtype, "backend": args.backend,
                   "backend_options": backend_options, "compile": bool(getattr(args, "compile", False))}
    spec = EngineSpec(model=args.model, device=str(checked["device"]), dtype=checked["dtype"],
                      backend=checked["backend"], backend_options=dict(checked["backend_options"]),
                      compile=bool(checked.get("compile", False)), threads=args.threads,
                      warmup_resolutions=tuple(_size(v) for v in getattr(args, "warmup_resolution", None) or ()),
                      warmup_batch_sizes=_numbers(getattr(args, "warmup_batch_sizes", None)))
    return options, spec


def _size(text: str) -> tuple[int, int]:
    """--warmup-resolution: "768" or "768x512" (height x width)."""
    try:
        sides = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or any(s < 64 or s % 64 for s in sides):
        raise Cones2Error(f"expected SIZE or HxW in multiples of 64, got {text!r}", "warmup-resolution")
    return (sides[0], sides[-1])


def _numbers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise Cones2Error(f"expected N[,N...] of positive integers, got {text!r}", "warmup-batch-sizes")
    return values


def run(args, limits: Limits, checked: dict | None = None) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options, spec = options_from_args(args, limits, checked)
    if options.grpc_port == 0:
        raise Cones2Error("give a port: Ray Serve's gRPC proxy listens on one fixed port on every node", "port")
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_):
        if serving.is_set():
            stop.set()
        else:                      # still deploying: unwind through the cleanup below
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    service = RayService(options, spec)
    try:
        service.start()
    except KeyboardInterrupt:
        service.stop()
        return 0
    except BaseException:
        service.stop()
        raise
    serving.set()
    for sig in (signal.SIGTERM, signal.SIGINT):   # ray.init may have installed its own
        signal.signal(sig, on_signal)
    scale = (f"{options.min_replicas}..{options.max_replicas} replicas (autoscaling, {options.replicas} at start)"
             if options.autoscaling else f"{options.replicas} replica(s)")
    http = f", HTTP JSON on http://{options.host}:{options.http_port}" if options.http_port else ""
    print(f"cones2-engine serve: SERVING on [::]:{options.grpc_port} via Ray Serve ({scale}, "
          f"{'1 GPU' if spec.device.startswith('cuda') else f'{options.replica_cpus:g} CPU'} each{http})", flush=True)
    while not stop.wait(0.5):
        pass
    print(f"cones2-engine serve: stopping (grace {options.grace_seconds:g}s)", file=sys.stderr, flush=True)
    service.stop()
    return 0
