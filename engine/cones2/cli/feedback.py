"""What a command says while it works: an elapsed-time bar for waits with no known length (loading a
model, a first-run export) and the closing line's stage times."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

TICK_SECONDS = 0.5


@contextmanager
def elapsed_bar(desc: str, enabled: bool):
    """A tqdm bar on stderr counting the seconds spent inside the block (when `enabled`)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    done = threading.Event()
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", leave=False)

    def tick():
        while not done.wait(TICK_SECONDS):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def stage_times(stages: dict[str, float]) -> str:
    """"load 2.10s, export 0.00s, ...": the stages in the order given."""
    return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in stages.items())


class Stopwatch:
    """Seconds since it was made."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
