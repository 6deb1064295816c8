"""The one results format every bench script writes, and the helper that writes it.

A results record is one JSON object:
  format    RESULT_FORMAT
  command   the command line that produced it, as run from the repository root
  git       the revision the code was at ("+dirty" with uncommitted changes), or NOT_RECORDED
  machine   platform, CPU, usable cores, load average (1, 5, 15 min) when written, GPU, torch
  settings  what the script was asked to do (its flags, resolved)
  payload   what it measured (the script's own shape)
  summaries optional: [{area, headline, details}]: the headline rows `bench/results_index.py` puts in
            bench/RESULTS.md (details: a write-up, relative to bench/results/)
  related   optional: other records of the same finding, relative to bench/results/
  files     optional: other files of the same run (logs, images), relative to the record's folder
Every file in bench/results/ is a record or listed in a record's `files`; after adding one, run
`python bench/results_index.py` (tests/test_results_index.py checks both).
Records converted from older shapes say NOT_RECORDED where a field was never saved; nothing is
invented. `bench/results_index.py` builds bench/RESULTS.md from these records.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULT_FORMAT = "cones2-bench-result/1"
NOT_RECORDED = "not recorded"
REPO = Path(__file__).resolve().parents[2]


def git_revision() -> str:
    """HEAD's commit, with "+dirty" when the tree has uncommitted changes; NOT_RECORDED outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return NOT_RECORDED
    return (rev + ("+dirty" if dirty else "")) if rev else NOT_RECORDED


def machine() -> dict:
    """What the numbers ran on, including how loaded the machine was (`os.getloadavg`)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else NOT_RECORDED,
            "gpu": NOT_RECORDED, "torch": NOT_RECORDED}
    if "torch" in sys.modules:                      # never import torch just to describe the machine
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def command_line(argv: list[str] | None, script: str) -> str:
    """The command as a user would type it from the repository root."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def result_record(settings: dict, payload, *, argv: list[str] | None = None, script: str,
                  summaries: list[dict] | None = None, files: list[str] | None = None) -> dict:
    """A record of the format above, for the run happening now."""
    record = {"format": RESULT_FORMAT, "command": command_line(argv, script), "git": git_revision(),
              "machine": machine(), "settings": settings, "payload": payload}
    if summaries:
        record["summaries"] = list(summaries)
    if files:
        record["files"] = list(files)
    return record


def write_result(path: str | os.PathLike, settings: dict, payload, *, argv: list[str] | None = None, script: str,
                 summaries: list[dict] | None = None, files: list[str] | None = None) -> Path:
    """Write a record of this run to `path` (folders made, replaced atomically); returns the path."""
    from cones2.atomic import atomic_write

    record = result_record(settings, payload, argv=argv, script=script, summaries=summaries, files=files)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(record, indent=1, default=str) + "\n").encode())
    return path


def read_result(path: str | os.PathLike) -> dict:
    """A record written by `write_result` (ValueError for a file in any other shape)."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path}: not a {RESULT_FORMAT} record")
    return record
