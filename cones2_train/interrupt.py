"""Ctrl-C during training: finish the current step, save a checkpoint, then stop.

While training runs in the main thread, the first SIGINT only sets a flag that the loop checks
between steps (so a checkpoint is never taken from a half-applied optimizer step); a second SIGINT
raises KeyboardInterrupt at once. Elsewhere (a worker thread) nothing is installed; use `should_stop`.
"""
from __future__ import annotations

import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped early at `step`; `checkpoint` is the folder to resume from (None if unsaved)."""

    def __init__(self, step: int, total: int, checkpoint=None):
        self.step, self.total, self.checkpoint = step, total, checkpoint
        where = f"; resume with --resume {checkpoint}" if checkpoint else " (no checkpoint_dir: nothing saved)"
        super().__init__(f"training interrupted after step {step}/{total}{where}")


class DeferredSigint:
    """Context manager: `.requested` turns True on the first Ctrl-C."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "DeferredSigint":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)
