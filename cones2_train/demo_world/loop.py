"""The step loop every demo-model stage shares: progress bar, loss log, periodic and Ctrl-C checkpoints.

The first Ctrl-C only sets a flag that is checked between steps, so a checkpoint is never taken from
a half-applied optimizer step; the loop then saves and raises `StageInterrupted`. A second Ctrl-C
aborts at once without saving.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

LOG_EVERY = 25


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped early at `step`; its checkpoint was saved."""

    def __init__(self, stage: str, step: int, total: int):
        self.stage, self.step, self.total = stage, step, total
        super().__init__(f"{stage} stage interrupted at step {step}/{total}; checkpoint saved (continue with --resume)")


class _DeferredSigint:
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)


def run_steps(stage: str, start: int, total: int, step_fn: Callable[[int], dict[str, float]],
              save_fn: Callable[[int, dict], None], *, log_path: Path, info: dict, save_every: int = 0,
              progress: bool = True, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run step_fn(step) for step = start..total-1; save_fn(steps_done, info) at every `save_every`
    steps, at the end, and on Ctrl-C / should_stop (then raise StageInterrupted).

    info carries "seconds" and "cpu_seconds" (wall and process CPU time in steps, accumulated over
    resumes; on a busy machine CPU time is the better measure of the work) and "losses" (last logged means);
    the updated dict is returned.
    """
    info = dict(info)
    info.setdefault("seconds", 0.0)
    info.setdefault("cpu_seconds", 0.0)
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not progress, dynamic_ncols=True)
    with _DeferredSigint() as sigint, open(log_path, "a") as log:
        step = start
        while step < total:
            t0, c0 = time.perf_counter(), time.process_time()
            losses = step_fn(step)
            info["seconds"] += time.perf_counter() - t0
            info["cpu_seconds"] += time.process_time() - c0
            step += 1
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            if count % LOG_EVERY == 0 or step == total:
                means = {k: v / count for k, v in sums.items()}
                info["losses"] = means
                bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
                entry = {"stage": stage, "step": step, "seconds": round(info["seconds"], 2), **means}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                sums, count = {}, 0
            stop = sigint.requested or (should_stop is not None and should_stop())
            if stop or step == total or (save_every and step % save_every == 0):
                save_fn(step, info)
            if stop and step < total:
                bar.close()
                raise StageInterrupted(stage, step, total)
    bar.close()
    return info
