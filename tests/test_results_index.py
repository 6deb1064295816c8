"""bench/RESULTS.md is generated from the results records and up to date; every file in
bench/results/ is one click from it; every record is in the one format (bench/harness/results.py);
and a bench script writes that format."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FORMAT = "cones2-bench-result/1"


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_results_md_is_what_the_generator_writes():
    run = _run(str(REPO / "bench" / "results_index.py"), "--check")
    assert run.returncode == 0, run.stderr


def test_every_results_file_is_linked_from_results_md():
    text = (REPO / "bench" / "RESULTS.md").read_text()
    linked = {(REPO / "bench" / target).resolve() for target in re.findall(r"\]\((results/[^)\s]+)\)", text)}
    missing = sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
                     if p.is_file() and p.resolve() not in linked)
    assert not missing, f"not reachable from bench/RESULTS.md: {missing}"
    broken = sorted(str(p) for p in linked if not p.exists())
    assert not broken, f"RESULTS.md links to missing files: {broken}"


def test_every_result_json_is_a_record_or_a_file_a_record_lists():
    records, listed = {}, set()
    for path in RESULTS.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == FORMAT:
            records[path] = data
    for path, record in records.items():
        assert {"command", "git", "machine", "settings", "payload"} <= set(record), path
        assert record["command"] and record["git"], path
        machine = record["machine"]
        assert machine == "not recorded" or "load_average" in machine, path
        listed |= {(path.parent / f).resolve() for f in record.get("files", [])}
        for other in record.get("related", []):
            assert (RESULTS / other).resolve() in {p.resolve() for p in records}, (path, other)
    others = [p for p in RESULTS.rglob("*.json") if p not in records]
    assert all(p.resolve() in listed for p in others), [str(p) for p in others if p.resolve() not in listed]


def test_a_bench_script_writes_the_one_format(tmp_path):
    """bench/quality.py on the world's own renders (no model): its --json is a results record with
    the command, the git revision, the machine's load average, the settings and the evaluation."""
    out = tmp_path / "q.json"
    run = _run(str(REPO / "bench" / "quality.py"), "--oracle", "--quick", "--no-residuals", "--prompts", "2",
               "--no-progress", "--json", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["format"] == FORMAT
    assert record["command"].startswith("python bench/quality.py --oracle --quick")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|not recorded", record["git"]), record["git"]   # no git: a tarball
    assert len(record["machine"]["load_average"]) == 3
    assert record["settings"]["oracle"] is True and record["settings"]["prompts"] == 3   # --quick's subset
    assert set(record["payload"]["layout"]) == {"2", "3"}
