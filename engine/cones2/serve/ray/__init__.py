"""`cones2.serve.ray`: cones2.v1.Cones2Service on Ray Serve (`cones2-engine serve --ray`).

Engine replicas (one per GPU, or CPU replicas) behind Ray Serve's gRPC proxy, speaking the same
proto as the in-process server, so `cones2.serve.client.Client` and reflection-based clients work
unchanged; each replica runs the same serving core (`cones2.serve.core`) as the in-process server;
residuals live in a content-addressed store on a folder every node mounts. See docs/serve.md ("Ray
Serve"). Needs the `ray` extra: pip install 'cones2-engine[ray]'.
"""
from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
    from ray import serve as _serve  # noqa: F401
except ImportError as exc:  # pragma: no cover (depends on the install)
    raise ImportError("cones2.serve.ray needs Ray Serve: pip install 'cones2-engine[ray]'") from exc

from .app import APP_NAME, ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, EngineSpec, RayServeOptions, RayService, build_app
from .deployment import REPLICA_METADATA, Cones2Engine, Reply
from .ingress import Cones2Ingress

__all__ = ["APP_NAME", "ENGINE_DEPLOYMENT", "INGRESS_DEPLOYMENT", "REPLICA_METADATA", "Cones2Engine", "Cones2Ingress",
           "EngineSpec", "RayServeOptions", "RayService", "Reply", "build_app"]
