"""Prometheus metrics of one server, optionally exposed on an HTTP port (`--metrics-port`).

Each server owns its own registry, so several servers in one process (tests) never collide.
Exposed: cones2_queue_depth, cones2_running_requests, cones2_ready, cones2_batch_size (histogram),
cones2_request_latency_seconds{method} (histogram), cones2_requests_total{method, code}.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    """The server's metrics. `queue_depth` and `running` are read when scraped."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float], max_batch: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("cones2_queue_depth", "Requests waiting in the queue.", registry=r).set_function(queue_depth)
        Gauge("cones2_running_requests", "Requests in the batch being sampled.", registry=r).set_function(running)
        self.ready = Gauge("cones2_ready", "1 once the model is loaded and warm, 0 otherwise.", registry=r)
        self.batch_size = Histogram("cones2_batch_size", "Requests per sampling loop.", registry=r,
                                    buckets=tuple(range(1, max(max_batch, 1) + 1)))
        self.latency = Histogram("cones2_request_latency_seconds", "RPC latency, from arrival to answer.",
                                 ["method"], registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("cones2_requests", "RPCs answered, by method and status code.",
                                ["method", "code"], registry=r)
        self._http = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def text(self) -> bytes:
        """The exposition text (what the HTTP endpoint serves)."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0 = any free port); returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
