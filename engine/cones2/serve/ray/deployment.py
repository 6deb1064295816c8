"""The Ray Serve adapter, replica side: `Cones2Engine` (one `Core` per replica); ingress.py is the
other side (`Cones2Ingress`, no model).

    Ray Serve gRPC / HTTP proxy  ->  Cones2Ingress  ->  Cones2Engine replicas (one per GPU)
                                     auth, status      Core: validate, queue, batch, Engine

Each replica runs the same serving core as the in-process server (one worker: the replica owns one
device), so validation, batching, previews, cancellation, warm-up and the status mapping are one
code. The ingress exists because a replica that dies with requests in flight would make Ray's proxy
answer INTERNAL: it sees the `RayActorError` and answers UNAVAILABLE, which clients retry (nothing
finished, so a retry is never a duplicate). Residuals live on a folder every node mounts.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from ray import serve

from ...threads import configure_threads
from .. import cones2_pb2 as pb
from ..core import DONE, UNARY, Core, CoreOptions, status_of
from ..handlers import add_service

log = logging.getLogger(__name__)

REPLICA_METADATA = "cones2-replica"   # trailing metadata / HTTP header: which engine replica answered
SERVICE = pb.DESCRIPTOR.services_by_name["Cones2Service"]
SERVICE_NAME = SERVICE.full_name


def add_Cones2ServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated stubs' name)
    """What Ray Serve's gRPC proxy loads: the service registered by `handlers.add_service`, whose
    decoder never raises (undecodable bytes reach the ingress as `Undecodable`: INVALID_ARGUMENT)."""
    add_service(server, servicer, SERVICE)


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 (grpc_health's name)
    """grpc.health.v1.Health with the same decoder: grpc_health's own answers bad bytes UNKNOWN."""
    add_service(server, servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])


@dataclass
class Reply:
    """An engine replica's answer: a proto message, or a status code name and details."""

    message: object = None
    code: str = "OK"
    details: str = ""
    replica: str = ""


class Cones2Engine:
    """One engine replica: a `Core` with one worker. Ready (and routed to) once warm."""

    def __init__(self, spec, options: CoreOptions):
        """spec: an `app.EngineSpec` (how to build the engine)."""
        configure_threads(spec.threads)
        self.core = Core(spec.build, options).start()
        self.core.wait_ready()        # a load error fails the replica (RayService reports it)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose worker thread died is replaced."""
        if not all(w.is_alive() for w in self.core.workers):
            raise RuntimeError("the engine worker stopped")

    def __del__(self):
        if hasattr(self, "core"):
            self.core.close()

    async def call(self, method: str, msg) -> Reply:
        """A unary RPC (Generate or one of `UNARY`) by its name."""
        with self.core.call(method) as call:
            try:
                if method == "Generate":
                    job, events = await self._submit(msg, stream=False)
                    try:
                        await events.get()
                    finally:
                        job.cancel()      # a no-op once done; the client left otherwise
                    return Reply(await asyncio.to_thread(job.response), replica=self.replica_id)
                return Reply(await asyncio.to_thread(getattr(self.core, UNARY[method]), msg), replica=self.replica_id)
            except Exception as exc:  # noqa: BLE001 (one status mapping for every transport)
                call.code, details = status_of(exc)
                return Reply(None, call.code, details, self.replica_id)

    async def generate_stream(self, msg):
        """Replies carrying Progress events, then the result (or one error Reply)."""
        with self.core.call("GenerateStream") as call:
            job = None
            try:
                job, events = await self._submit(msg, stream=True)
                while (e := await events.get()) is not DONE:
                    yield Reply(pb.GenerateEvent(progress=pb.Progress(step=e.step, total_steps=e.total,
                                                                      preview_png=e.preview_png or b"")),
                                replica=self.replica_id)
                yield Reply(pb.GenerateEvent(result=await asyncio.to_thread(job.response)), replica=self.replica_id)
            except Exception as exc:  # noqa: BLE001
                call.code, details = status_of(exc)
                yield Reply(None, call.code, details, self.replica_id)
            finally:
                if job is not None:
                    job.cancel()

    async def _submit(self, msg, stream: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = await asyncio.to_thread(self.core.submit, msg, stream=stream,
                                      sink=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        return job, events
