"""The serving core every transport uses (in-process gRPC, HTTP/JSON, a Ray Serve replica).

    request message -> validate -> bounded queue (full: QueueFull) -> batches of one batch key ->
    Engine.generate_batch (step previews, cancellation, deadlines) -> one by one on a batch failure
    -> GenerateResponse, or an exception that `status_of` maps to one status for every transport.

`Core` owns the engine workers, the residual store, the queue, the metrics and the drain; the
adapters only decode their transport's message, call `Core`, and encode the answer or the status.
A worker takes the oldest live job plus every queued job with the same `batch_key()` (up to
`max_batch`); a batch stops as soon as all its jobs are cancelled or past their deadline, and a
cancelled member of a larger batch is answered at once while the others run on.
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import Cones2Error, Engine, Generation, GenerationCancelled, GenerationRequest, __version__, cache_root
from . import cones2_pb2 as pb
from .metrics import Metrics
from .preview import latent_preview_png
from .residual_store import ResidualInfo, ResidualStore, StoreFull
from .validation import Limits, ValidatedRequest, validate

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 300     # every reply's message is cut to this (gRPC trailers, HTTP bodies alike)


class QueueFull(Exception):
    """The queue holds max_queue jobs."""


class ShuttingDown(Exception):
    """The service no longer accepts jobs."""


class NotReady(Exception):
    """The model is still loading or warming up."""


class NotFound(Exception):
    """No such residual (or request id)."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished."""


class WorkerStopped(Exception):
    """The engine worker running the job stopped (it died, or the server stopped); nothing finished."""


class TooLarge(Exception):
    """A request over the transport's size limit (gRPC answers these itself)."""


# Exception -> (gRPC status name, HTTP status): the one mapping; anything else is INTERNAL / 500.
STATUSES: list[tuple[tuple[type, ...], str, int]] = [
    ((Cones2Error,), "INVALID_ARGUMENT", 400),
    ((QueueFull, StoreFull, TooLarge), "RESOURCE_EXHAUSTED", 429),
    ((NotReady, ShuttingDown, WorkerStopped), "UNAVAILABLE", 503),
    ((DeadlineExceeded,), "DEADLINE_EXCEEDED", 504),
    ((GenerationCancelled,), "CANCELLED", 499),
    ((NotFound,), "NOT_FOUND", 404),
]
HTTP_STATUS = {name: http for _, name, http in STATUSES} | {"OK": 200, "UNAUTHENTICATED": 401, "INTERNAL": 500}
# The unary RPCs other than Generate, and the `Core` method answering each.
UNARY = {"RegisterResidual": "register_residual", "ListResiduals": "list_residuals",
         "DeleteResidual": "delete_residual", "GetServerInfo": "server_info"}


def status_of(exc: BaseException) -> tuple[str, str]:
    """(status code name, short message) for an exception; unexpected ones are INTERNAL with the
    trace in the log, never in the reply."""
    for kinds, name, _http in STATUSES:
        if isinstance(exc, kinds):
            message = str(exc)
            break
    else:
        log.error("internal error", exc_info=exc)
        name, message = "INTERNAL", f"internal error ({type(exc).__name__}); see the server log"
    if len(message) > MAX_DETAIL_CHARS:
        message = f"{message[:MAX_DETAIL_CHARS - 25]}... ({len(message)} chars)"
    return name, message


@dataclass(frozen=True)
class Progress:
    step: int                 # 1-based
    total: int
    preview_png: bytes | None


DONE = object()   # last event of a job

# Loading checkpoints is not thread-safe (transformers/accelerate patch torch globally while they build
# modules on the meta device), so workers load their engines one after another.
_LOAD_LOCK = threading.Lock()


class Job:
    """One request in flight. deadline: a time.monotonic() value or None. sink(event): receives
    Progress events (when `stream`) and DONE; None with `stream` = collect them in `events`."""

    def __init__(self, v: ValidatedRequest, *, deadline: float | None = None, stream: bool = False,
                 sink: Callable[[object], None] | None = None, request_id: str = ""):
        self.request: GenerationRequest = v.request
        self.located = v.located
        self.output_format, self.preview_every, self.deadline = v.output_format, v.preview_every, deadline
        self.stream, self.request_id = stream, request_id
        self.events: queue.SimpleQueue | None = None
        if sink is None and stream:
            self.events = queue.SimpleQueue()
            sink = self.events.put
        self.sink = sink
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.batch_size = 0
        self.outcome: Generation | BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._queue: JobQueue | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def finish(self, outcome: Generation | BaseException) -> bool:
        """Set the outcome once; later calls are ignored (False)."""
        with self._lock:
            if self._done.is_set():
                return False
            self.outcome = outcome
            self._done.set()
        if self.sink is not None:
            self.sink(DONE)
        for callback in self._callbacks:
            callback()
        return True

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the job is done (at once if it is)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self, reason: str = "cancelled by the client", *, deadline_passed: bool = False) -> None:
        """Give up on the job: its queue slot is freed now; a running batch drops its result."""
        if self._queue is not None:
            self._queue.remove(self)
        self.finish(DeadlineExceeded("deadline passed") if deadline_passed or self.expired()
                    else GenerationCancelled(reason))

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the job is done, after waiting up to `timeout` seconds."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Generation:
        """The Generation, or raises the job's exception."""
        self._done.wait(timeout)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def response(self) -> pb.GenerateResponse:
        """The finished job as the proto answer (PNG, or latents as safetensors)."""
        gen = self.result()
        timings = dict(gen.timings) | {"queue": (self.started or self.submitted) - self.submitted}
        resp = pb.GenerateResponse(seed=gen.seed, timings=timings, engine_version=__version__, model_id=gen.model_id,
                                   backend=gen.backend, batch_size=self.batch_size, width=gen.image.width,
                                   height=gen.image.height)
        if self.output_format == "latents":
            from safetensors.torch import save

            resp.latents = save({"latents": gen.latents.contiguous(), "cond_embeddings": gen.cond_embeddings.contiguous()},
                                metadata={k: val if isinstance(val, str) else json.dumps(val)
                                          for k, val in gen.parameters().items()})
        else:
            resp.image = gen.png()
        return resp

    def progress(self, step: int, total: int, latents) -> None:
        if self.stream and self.sink is not None and not self.done:
            every = self.preview_every
            preview = latent_preview_png(latents) if every and (step % every == 0 or step == total) else None
            self.sink(Progress(step, total, preview))


@dataclass
class Stats:
    """Counters for tests and metrics, updated under the queue's lock."""

    batches: int = 0
    jobs_run: int = 0           # jobs whose sampling loop ended (finished, failed or stopped)
    jobs_dropped: int = 0       # cancelled or expired while queued: never ran
    running: int = 0            # jobs in the batches being sampled now (all workers)
    retried_alone: int = 0      # jobs re-run one by one after their batch failed


class JobQueue:
    """A bounded FIFO of jobs that hands out compatible batches."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.stats = Stats()
        self._items: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def depth(self) -> int:
        return len(self._items)

    def put(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._items) >= self.max_size:
                raise QueueFull(f"the queue is full ({self.max_size} requests waiting); retry later")
            job._queue = self
            self._items.append(job)
            self._cond.notify()

    def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._items.remove(job)
            except ValueError:
                return False
            self.stats.jobs_dropped += 1
            return True

    def take_batch(self, max_batch: int, timeout: float) -> list[Job] | None:
        """The oldest live job and up to max_batch - 1 queued jobs with its batch key; None on timeout."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            now = time.monotonic()
            for job in [j for j in self._items if j.done or j.expired(now)]:
                self._items.remove(job)
                job._queue = None
                self.stats.jobs_dropped += 1
                job.finish(DeadlineExceeded("deadline passed while queued"))
            if not self._items:
                return None
            first = self._items.popleft()
            key, batch = first.request.batch_key(), [first]
            for job in list(self._items):
                if len(batch) >= max_batch:
                    break
                if job.request.batch_key() == key:
                    self._items.remove(job)
                    batch.append(job)
            for job in batch:
                job._queue = None
            self.stats.running += len(batch)
            self.stats.batches += 1
            return batch

    def batch_ended(self, n: int) -> None:
        with self._cond:
            self.stats.running -= n
            self.stats.jobs_run += n

    def close(self) -> list[Job]:
        """Accept no more jobs; wake the workers. Returns the jobs still queued (they stay queued)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            return list(self._items)


def warm_up(engine: Engine, resolutions: tuple = (), batch_sizes: tuple[int, ...] = (), *, max_batch: int) -> None:
    """The one warm-up (in-process workers and Ray replicas alike): the given shapes through
    `Engine.warmup` (batch sizes default to 1..max_batch; a compiled engine with no shapes warms the
    model's resolution); otherwise one 64-px, 1-step smoke generation."""
    if not resolutions and not batch_sizes and not getattr(engine, "compile", False):
        engine.generate_batch([engine.request("warm up", height=64, width=64, steps=1)], progress=False)
        return
    spent = engine.warmup(resolutions=list(resolutions) or None, batch_sizes=list(batch_sizes) or
                          list(range(1, max_batch + 1)))
    log.info("warm in %.1fs (%s)", sum(spent.values()),
             ", ".join(f"{h}x{w} batch {b}: {t:.1f}s" for (h, w, b), t in spent.items()))


class Worker(threading.Thread):
    """Owns one engine (built in this thread by `engine_factory`), warms it up, then serves batches.
    `ready` is set once warm, or failed (then `error` holds why)."""

    def __init__(self, name: str, engine_factory: Callable[[], Engine], jobs: JobQueue, options: "CoreOptions",
                 on_batch: Callable[[int], None], on_death: Callable[["Worker"], None] = lambda _w: None):
        super().__init__(name=name, daemon=True)
        self.engine_factory, self.jobs, self.options, self.on_batch = engine_factory, jobs, options, on_batch
        self.on_death = on_death          # called (in this thread) when the thread dies of an error
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._abort = threading.Event()

    def abort(self) -> None:
        """Stop the running batch at the next step and exit once the queue is closed."""
        self._abort.set()

    def run(self) -> None:
        o = self.options
        try:
            with _LOAD_LOCK:
                self.engine = self.engine_factory()
            if o.warmup:
                warm_up(self.engine, o.warmup_resolutions, o.warmup_batch_sizes, max_batch=o.max_batch)
        except BaseException as exc:  # noqa: BLE001 (reported through `error`, the thread must end cleanly)
            log.exception("%s: loading the engine failed", self.name)
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        while not (self.jobs.closed and (self._abort.is_set() or not self.jobs.depth())):
            batch = self.jobs.take_batch(o.max_batch, timeout=0.25)
            if batch:
                try:
                    self._run(batch)
                except BaseException:      # the thread dies: its jobs get a retryable answer, not silence
                    log.exception("%s: the worker stopped", self.name)
                    for job in batch:
                        job.finish(WorkerStopped("the engine worker stopped while running this request; retry it"))
                    self.on_death(self)
                    raise
                finally:
                    self.jobs.batch_ended(len(batch))

    def _run(self, batch: list[Job]) -> None:
        try:
            if self._abort.is_set():
                raise GenerationCancelled("the server stopped")
            results = self._generate(batch)
        except GenerationCancelled as exc:
            for job in batch:
                job.finish(DeadlineExceeded("deadline passed during sampling") if job.expired() else exc)
            return
        except Exception as exc:  # noqa: BLE001 (one bad batch must never take the worker down)
            if len(batch) > 1:
                log.warning("%s: a batch of %d failed (%s); running its requests one by one", self.name, len(batch), exc)
                self.jobs.stats.retried_alone += len(batch)
                for job in batch:
                    self._run([job])
                return
            log.exception("%s: request failed", self.name)
            batch[0].finish(exc)
            return
        for job, result in zip(batch, results):
            job.finish(result)

    def _generate(self, batch: list[Job]) -> list[Generation]:
        live = [job for job in batch if not job.done]
        now = time.monotonic()
        for job in batch:
            job.started, job.batch_size = now, len(batch)
        self.on_batch(len(batch))

        def should_stop() -> bool:
            if self._abort.is_set():
                return True
            t = time.monotonic()
            for job in live:
                if not job.done and job.expired(t):
                    job.finish(DeadlineExceeded("deadline passed during sampling"))
            return all(job.done for job in live)

        def on_step(i: int, n: int, latents) -> None:
            for k, job in enumerate(batch):
                job.progress(i + 1, n, latents[k])

        located = None if any(j.located is None for j in batch) else [j.located for j in batch]
        return self.engine.generate_batch([j.request for j in batch], progress=False, on_step=on_step,
                                          should_stop=should_stop, located=located)


@dataclass(frozen=True)
class CoreOptions:
    """What every transport shares: queue, batching, workers, limits, residual folder, warm-up.

    warmup_resolutions (sides or (height, width)) / warmup_batch_sizes: shapes every worker compiles
    (`Engine.warmup`) before ready; see `warm_up` for the defaults."""

    residual_store: str | Path | None = None
    max_queue: int = 32
    max_batch: int = 4
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    warmup: bool = True
    warmup_resolutions: tuple = ()
    warmup_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "workers"):
            if int(getattr(self, name)) < 1:
                raise Cones2Error(f"must be >= 1, got {getattr(self, name)}", name)
        for b in self.warmup_batch_sizes:
            if not 1 <= b <= self.max_batch:
                raise Cones2Error(f"batch size {b} is outside [1, max_batch={self.max_batch}]", "warmup_batch_sizes")


class Core:
    """The service without a transport. `engine_factory()` runs once per worker, in its thread.

        core = Core(factory, CoreOptions()).start(); core.wait_ready()
        job = core.submit(msg); resp = job.response()      # or stream job.events
        core.close(grace)                                  # drain: refuse new work, finish, stop
    """

    def __init__(self, engine_factory: Callable[[], Engine], options: CoreOptions | None = None):
        self.options = o = options or CoreOptions()
        self.jobs = JobQueue(o.max_queue)
        self.metrics = Metrics(self.jobs.depth, lambda: self.jobs.stats.running, o.max_batch)
        self.workers = [Worker(f"cones2-worker-{i}", engine_factory, self.jobs, o, self.metrics.batch_size.observe,
                               self._worker_died) for i in range(o.workers)]
        self.engine: Engine | None = None
        self.store: ResidualStore | None = None
        self.ready = threading.Event()           # set when warm, or when loading failed
        self.load_error: BaseException | None = None
        self.accepting = True
        self._inflight, self._idle = 0, threading.Condition()
        self._by_id: dict[str, Job] = {}
        self._on_ready: list[Callable[[], None]] = []
        self._on_dead: list[Callable[[], None]] = []

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, on_ready: Callable[[], None] | None = None, on_dead: Callable[[], None] | None = None) -> "Core":
        """Start the workers. on_ready(): once warm; on_dead(): once every worker has died (health
        turns NOT_SERVING: nothing can be answered any more)."""
        if on_ready is not None:
            self._on_ready.append(on_ready)
        if on_dead is not None:
            self._on_dead.append(on_dead)
        for w in self.workers:
            w.start()
        threading.Thread(target=self._become_ready, name="cones2-ready", daemon=True).start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once ready; False on timeout; re-raises the error if loading the model failed."""
        if not self.ready.wait(timeout):
            return False
        if self.load_error is not None:
            raise self.load_error
        return True

    @property
    def serving(self) -> bool:
        return self.accepting and self.ready.is_set() and self.load_error is None and self.store is not None and \
            any(w.is_alive() for w in self.workers)

    def _become_ready(self) -> None:
        for w in self.workers:
            w.ready.wait()
        try:
            failed = [w.error for w in self.workers if w.error is not None]
            if failed:
                raise failed[0]
            self.engine = self.workers[0].engine
            root = self.options.residual_store
            root = cache_root() / "residuals" if root is None else root
            self.store = ResidualStore(root, self.engine.text_dim, max_bytes=self.options.limits.max_residual_bytes)
        except BaseException as exc:  # noqa: BLE001 (reported by wait_ready; never serving)
            self.load_error = exc
            self.ready.set()
            return
        if self.accepting:
            self.metrics.ready.set(1)
            for callback in self._on_ready:
                callback()
            log.info("ready: %s on %s (%s), %d worker(s), max batch %d, queue %d", self.engine.components.model_id,
                     self.engine.device, self.engine.default_backend, len(self.workers), self.options.max_batch,
                     self.options.max_queue)
        self.ready.set()

    def _worker_died(self, worker: Worker) -> None:
        """A worker thread is dying (it is still alive while this runs): the last one takes the
        service down (not ready in the metrics, `on_dead` callbacks)."""
        if any(w is not worker and w.is_alive() for w in self.workers):
            return
        log.error("every engine worker has stopped: not serving")
        self.metrics.ready.set(0)
        for callback in self._on_dead:
            callback()

    def stop_accepting(self) -> None:
        """Drain step 1: new calls get UNAVAILABLE (ShuttingDown); work in flight goes on."""
        self.accepting = False
        self.metrics.ready.set(0)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is being answered (see `call`)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._inflight, timeout)

    def close(self) -> None:
        """Drain step 2: cancel what is still queued, stop the workers."""
        self.stop_accepting()
        for job in self.jobs.close():
            job.cancel("the server stopped")
        for w in self.workers:
            w.abort()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=10)

    # ---- calls (any transport) ----------------------------------------------------------------
    def call(self, method: str):
        """A context manager around one call of any transport: counts it in flight (the drain waits
        for it) and records its latency and status code in the metrics."""
        return _Call(self, method)

    def check_available(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        if not self.ready.is_set() or self.load_error is not None or self.store is None:
            raise NotReady("the model is loading or warming up; retry when health reports SERVING")
        if not any(w.is_alive() for w in self.workers):
            raise WorkerStopped("no engine worker is running")

    def submit(self, msg: pb.GenerateRequest, *, deadline: float | None = None, stream: bool = False,
               sink: Callable[[object], None] | None = None, request_id: str = "") -> Job:
        """Validate and queue one request (QueueFull when the queue is full)."""
        self.check_available()
        v = validate(msg, self.engine, self.store, self.options.limits)
        job = Job(v, deadline=deadline, stream=stream, sink=sink, request_id=request_id)
        self.jobs.put(job)
        if request_id:
            with self._idle:
                self._by_id[request_id] = job
            job.add_done_callback(lambda: self._forget(job))
        return job

    def cancel(self, request_id: str) -> None:
        """Cancel the job submitted with `request_id` (NotFound when none is in flight)."""
        with self._idle:
            job = self._by_id.get(request_id)
        if job is None or job.done:
            raise NotFound(f"request_id: no request {request_id!r} in flight")
        job.cancel()

    def register_residual(self, msg: pb.RegisterResidualRequest) -> pb.RegisterResidualResponse:
        self.check_available()
        info, created = self.store.register(msg.safetensors, "safetensors")
        return pb.RegisterResidualResponse(residual=residual_info(info), created=created)

    def list_residuals(self, msg: pb.ListResidualsRequest | None = None) -> pb.ListResidualsResponse:
        self.check_available()
        return pb.ListResidualsResponse(residuals=[residual_info(i) for i in self.store.list()])

    def delete_residual(self, msg: pb.DeleteResidualRequest) -> pb.DeleteResidualResponse:
        self.check_available()
        if not self.store.delete(msg.id, "id"):
            raise NotFound(f"id: no residual with id {msg.id}")
        return pb.DeleteResidualResponse()

    def server_info(self, msg: pb.GetServerInfoRequest | None = None) -> pb.ServerInfo:
        self.check_available()
        e, o, lim = self.engine, self.options, self.options.limits
        return pb.ServerInfo(engine_version=__version__, model_id=e.components.model_id, backend=e.default_backend,
                             device=str(e.device), text_dim=e.text_dim, default_resolution=e.default_resolution,
                             max_resolution=lim.max_resolution, max_steps=lim.max_steps, max_subjects=lim.max_subjects,
                             max_batch=o.max_batch, max_queue=o.max_queue, max_residual_bytes=lim.max_residual_bytes)

    def _forget(self, job: Job) -> None:
        with self._idle:
            if self._by_id.get(job.request_id) is job:
                del self._by_id[job.request_id]


class _Call:
    """See `Core.call`. `code` may be set by the adapter (e.g. CANCELLED when the client left)."""

    def __init__(self, core: Core, method: str):
        self.core, self.method, self.code = core, method, "OK"

    def __enter__(self) -> "_Call":
        self.start = time.monotonic()
        with self.core._idle:
            self.core._inflight += 1
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self.code == "OK":   # the adapter did not map it: the client left
            self.code = "CANCELLED"
        self.core.metrics.observe(self.method, self.code, time.monotonic() - self.start)
        with self.core._idle:
            self.core._inflight -= 1
            if not self.core._inflight:
                self.core._idle.notify_all()


def residual_info(info: ResidualInfo) -> pb.ResidualInfo:
    return pb.ResidualInfo(id=info.id, word=info.word, rows=info.rows, dim=info.dim, base_model=info.base_model,
                           size_bytes=info.size_bytes, metadata=info.metadata)
