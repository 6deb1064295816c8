"""The engine side of the server: a bounded job queue and one worker thread per engine.

Requests wait in a bounded queue (`put` fails at once when full: no unbounded memory). A worker
takes the oldest live job plus every queued job with the same `batch_key()` (up to `max_batch`) and
runs them through one `Engine.generate_batch` loop; each result equals the single-request result up
to float rounding (per-sample std and noise streams).

Cancellation and deadlines: a job cancelled or past its deadline while queued is dropped without
running. While running, `should_stop` is polled between UNet calls: a batch stops as soon as *all*
of its jobs are cancelled or expired (so a lone request frees the worker within one step); a
cancelled member of a larger batch gets its answer at once and its result is dropped, while the
others run on undisturbed.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .. import Engine, Generation, GenerationCancelled, GenerationRequest
from .preview import latent_preview_png

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds max_queue jobs."""


class ShuttingDown(Exception):
    """The queue no longer accepts jobs."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished."""


@dataclass(frozen=True)
class Progress:
    step: int                 # 1-based
    total: int
    preview_png: bytes | None


DONE = object()   # last item of a job's event queue

# Loading checkpoints is not thread-safe (transformers/accelerate patch torch globally while they build
# modules on the meta device), so workers load their engines one after another.
_LOAD_LOCK = threading.Lock()


class Job:
    """One request in flight. `deadline`: time.monotonic() value, or None.

    `want_events`: collect Progress items in `events` (GenerateStream); `preview_every`: attach a
    preview PNG every k steps (0 = never).
    """

    def __init__(self, request: GenerationRequest, *, deadline: float | None = None, want_events: bool = False,
                 preview_every: int = 0):
        self.request, self.deadline, self.preview_every = request, deadline, preview_every
        self.events: queue.SimpleQueue | None = queue.SimpleQueue() if want_events else None
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.batch_size = 0
        self.outcome: Generation | BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._queue: JobQueue | None = None

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
        if self.events is not None:
            self.events.put(DONE)
        return True

    def cancel(self, reason: str = "cancelled by the client", *, deadline_passed: bool = False) -> None:
        """Give up on the job: its queue slot is freed now; a running batch drops its result."""
        if self._queue is not None:
            self._queue.remove(self)
        self.finish(DeadlineExceeded("deadline passed") if deadline_passed or self.expired()
                    else GenerationCancelled(reason))

    def wait(self, timeout: float | None = None) -> Generation | BaseException | None:
        self._done.wait(timeout)
        return self.outcome

    def progress(self, step: int, total: int, preview: bytes | None) -> None:
        if self.events is not None and not self.done:
            self.events.put(Progress(step, total, preview))


@dataclass
class Stats:
    """Counters for tests and metrics, updated under the queue's lock."""

    batches: int = 0
    jobs_run: int = 0
    jobs_dropped: int = 0       # cancelled or expired while queued: never ran
    running: int = 0            # jobs in the batch being sampled now (all workers)


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
            self._drop_dead()
            if not self._items:
                return None
            first = self._items.popleft()
            key = first.request.batch_key()
            batch = [first]
            for job in list(self._items):
                if len(batch) >= max_batch:
                    break
                if job.request.batch_key() == key:
                    self._items.remove(job)
                    batch.append(job)
            for job in batch:
                job._queue = None
            return batch

    def count_running(self, n: int) -> None:
        """A worker starts (n > 0) or ends (n < 0) a batch of |n| jobs."""
        with self._cond:
            self.stats.running += n
            if n > 0:
                self.stats.batches += 1
            else:
                self.stats.jobs_run -= n

    def close(self) -> list[Job]:
        """Accept no more jobs; wake the workers. Returns the jobs still queued (they stay queued)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            return list(self._items)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._items if j.done or j.expired(now)]:
            self._items.remove(job)
            job._queue = None
            self.stats.jobs_dropped += 1
            job.finish(DeadlineExceeded("deadline passed while queued"))


class Worker(threading.Thread):
    """Owns one engine (built in this thread by `engine_factory`), warms it up, then serves batches.

    `ready` is set once the engine is warm (or failed: then `error` holds why). `on_batch(n)` is called
    for every batch run. warmup_resolutions / warmup_batch_sizes: the shapes `Engine.warmup` compiles
    before `ready` (sides or (height, width); empty: a 64-px smoke generation, or for a compiled
    engine the model's resolution at batch sizes 1..max_batch).
    """

    def __init__(self, name: str, engine_factory: Callable[[], Engine], jobs: JobQueue, *, max_batch: int,
                 on_batch: Callable[[int], None] | None = None, warmup: bool = True,
                 warmup_resolutions: tuple = (), warmup_batch_sizes: tuple[int, ...] = ()):
        super().__init__(name=name, daemon=True)
        self.engine_factory, self.jobs, self.max_batch = engine_factory, jobs, max_batch
        self.on_batch, self.warmup = on_batch, warmup
        self.warmup_resolutions, self.warmup_batch_sizes = tuple(warmup_resolutions), tuple(warmup_batch_sizes)
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._abort = threading.Event()

    def abort(self) -> None:
        """Stop the running batch at the next step and exit once the queue is closed."""
        self._abort.set()

    def run(self) -> None:
        try:
            with _LOAD_LOCK:
                self.engine = self.engine_factory()
            if self.warmup:
                self._warm_up()
        except BaseException as exc:  # noqa: BLE001 (reported through `error`, the thread must end cleanly)
            log.exception("%s: loading the engine failed", self.name)
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        while not (self.jobs.closed and (self._abort.is_set() or not self.jobs.depth())):
            batch = self.jobs.take_batch(self.max_batch, timeout=0.25)
            if batch:
                self._run(batch)

    def _warm_up(self) -> None:
        if not self.warmup_resolutions and not self.warmup_batch_sizes and not getattr(self.engine, "compile", False):
            self.engine.generate_batch([self.engine.request("warm up", height=64, width=64, steps=1)], progress=False)
            return
        spent = self.engine.warmup(resolutions=list(self.warmup_resolutions) or None,
                                   batch_sizes=list(self.warmup_batch_sizes) or list(range(1, self.max_batch + 1)))
        log.info("%s: warm in %.1fs (%s)", self.name, sum(spent.values()),
                 ", ".join(f"{h}x{w} batch {b}: {t:.1f}s" for (h, w, b), t in spent.items()))

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
                log.warning("%s: a batch of %d failed (%s); running its requests one by one",
                            self.name, len(batch), exc)
                for job in batch:
                    self._run([job])
                return
            log.exception("%s: request failed", self.name)
            batch[0].finish(exc)
            return
        for job, result in zip(batch, results):
            job.finish(result)

    def _generate(self, batch: list[Job]) -> list[Generation]:
        now = time.monotonic()
        for job in batch:
            job.started, job.batch_size = now, len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))

        def should_stop() -> bool:
            if self._abort.is_set():
                return True
            t = time.monotonic()
            for job in batch:
                if not job.done and job.expired(t):
                    job.finish(DeadlineExceeded("deadline passed during sampling"))
            return all(job.done for job in batch)

        def on_step(i: int, n: int, latents) -> None:
            for k, job in enumerate(batch):
                if job.events is None or job.done:
                    continue
                every = job.preview_every
                preview = latent_preview_png(latents[k]) if every and ((i + 1) % every == 0 or i + 1 == n) else None
                job.progress(i + 1, n, preview)

        self.jobs.count_running(len(batch))
        try:
            return self.engine.generate_batch([j.request for j in batch], progress=False, on_step=on_step,
                                              should_stop=should_stop)
        finally:
            self.jobs.count_running(-len(batch))
