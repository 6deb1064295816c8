"""Run `cones2-engine` / `cones2-train` as a user does: a subprocess of the installed script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, program: str = "cones2-engine", env: dict | None = None) -> subprocess.CompletedProcess:
    """The command's exit code, stdout and stderr (text). The suite's environment is kept (tiny default
    model, isolated cache, CONES2_BACKEND=sdpa) unless `env` changes it."""
    exe = str(Path(sys.executable).parent / program)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)
