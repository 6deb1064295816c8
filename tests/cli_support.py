"""Run `cones2-engine` / `cones2-train` as a user does: a subprocess of the installed script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, program: str = "cones2-engine", env: dict | None = None) -> subprocess.CompletedProcess:
    """The command's exit code, stdout and stderr (text). The suite's environment is kept (tiny default
    model, isolated cache, CONES2_BACKEND=sdpa) unless `env` changes it (a None value removes a variable)."""
    exe = str(Path(sys.executable).parent / program)
    merged = {**os.environ, **(env or {})}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in merged.items() if v is not None})
