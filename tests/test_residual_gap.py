"""`bench/residual_gap.py` (issue 24's residual bound), run as the script it is on hand-made records:
each side's records pool by counts, the two sides must have run the same seeds, a figure is within
the bound only from below, and the 95% interval at the boundary equals its closed form."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ("twotone_circle", "twotone_heart", "twotone_triangle")
PAIRS = ("twotone_circle+twotone_heart", "twotone_circle+twotone_triangle", "twotone_heart+twotone_triangle")


def _record(path: Path, first: int, n: int, alone: float, composed: float, demo: float) -> str:
    """A demo-world evaluation record with the given rates on seeds first .. first + n - 1."""
    residuals = {name: {"with": {"images": n, "exact": alone}} for name in NAMES}
    residuals["composition"] = {pair: {"with": {"both": composed}} for pair in PAIRS}
    residuals["demo"] = {"with": {"both": demo}}
    payload = {"settings": {"residual_prompts": n, "first_residual_prompt": first}, "residuals": residuals}
    path.write_text(json.dumps({"format": "cones2-bench-result/1", "payload": payload}))
    return str(path)


def _gap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "residual_gap.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_pooled_counts_bound_from_below_and_the_interval_at_the_boundary(tmp_path):
    fast = [_record(tmp_path / "f0.json", 0, 10, 1.0, 0.9, 1.0), _record(tmp_path / "f1.json", 10, 10, 1.0, 1.0, 1.0)]
    paper = [_record(tmp_path / "p0.json", 0, 10, 0.0, 1.0, 0.9), _record(tmp_path / "p1.json", 10, 10, 0.0, 1.0, 1.0)]
    out = tmp_path / "gap.json"
    run = _gap("--fast", *fast, "--paper-exact", *paper, "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = {r["figure"]: r for r in json.loads(out.read_text())["payload"]["rows"]}
    circle = rows["alone twotone_circle"]
    assert circle["fast"] == [20, 20] and circle["paper_exact"] == [0, 20] and circle["within"]   # better: within
    # 20/20 against 0/20: Wilson's limits at k = n and k = 0 are n / (n + z^2) and z^2 / (n + z^2), so
    # Newcombe's lower limit is 1 - sqrt(2) z^2 / (n + z^2) and the upper one is 1.
    z2 = 1.959964 ** 2
    assert circle["ci95"][0] == pytest.approx(1 - math.sqrt(2) * z2 / (20 + z2), abs=1e-9)
    assert circle["ci95"][1] == pytest.approx(1.0, abs=1e-9)
    composed = rows["composed twotone_circle+twotone_heart"]
    assert composed["fast"] == [19, 20] and composed["paper_exact"] == [20, 20]
    assert composed["gap"] == pytest.approx(-0.05, abs=1e-9) and not composed["within"]   # 0.05 below
    assert rows["make demo"]["gap"] == pytest.approx(0.05, abs=1e-9) and rows["make demo"]["within"]
    assert "**no**" in run.stdout and "4 of 7 figures within 0.03" in run.stdout   # the three pairs
    assert _gap("--fast", *fast, "--paper-exact", *paper, "--bound", "0.06").stdout.count("**no**") == 0


def test_different_or_overlapping_seeds_are_refused_in_one_line(tmp_path):
    fast = _record(tmp_path / "f.json", 0, 10, 1.0, 1.0, 1.0)
    later = _record(tmp_path / "p.json", 200, 10, 1.0, 1.0, 1.0)
    run = _gap("--fast", fast, "--paper-exact", later)
    assert run.returncode != 0 and "ran different seeds" in run.stderr and "Traceback" not in run.stderr
    again = _record(tmp_path / "f2.json", 5, 10, 1.0, 1.0, 1.0)
    run = _gap("--fast", fast, again, "--paper-exact", later)
    assert run.returncode != 0 and "overlap" in run.stderr and "Traceback" not in run.stderr


def test_one_record_pools_against_the_same_seeds_split_in_several(tmp_path):
    """Seeds 0-19 in one fast record and in two paper-exact records (0-9, 10-19) are the same seeds."""
    fast = _record(tmp_path / "f.json", 0, 20, 1.0, 1.0, 1.0)
    paper = [_record(tmp_path / "p0.json", 0, 10, 1.0, 1.0, 0.5), _record(tmp_path / "p1.json", 10, 10, 1.0, 1.0, 1.0)]
    out = tmp_path / "gap.json"
    run = _gap("--fast", fast, "--paper-exact", *paper, "--json", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["payload"]
    assert result["seeds"] == [[0, 19]]
    demo = {r["figure"]: r for r in result["rows"]}["make demo"]
    assert demo["fast"] == [20, 20] and demo["paper_exact"] == [15, 20]
    gapped = _gap("--fast", fast, "--paper-exact", paper[0], _record(tmp_path / "p2.json", 11, 9, 1.0, 1.0, 1.0))
    assert gapped.returncode != 0 and "ran different seeds" in gapped.stderr      # seed 10 missing
    only_heart = json.loads(Path(paper[1]).read_text())
    only_heart["payload"]["residuals"] = {"twotone_heart": {"with": {"images": 10, "exact": 1.0}}, "composition": {}}
    Path(paper[1]).write_text(json.dumps(only_heart))                   # one instance scored (--instance)
    partial = _gap("--fast", fast, "--paper-exact", *paper)
    assert partial.returncode != 0 and "not in every record" in partial.stderr and "Traceback" not in partial.stderr
    run = _gap("--fast", paper[1], "--paper-exact", _record(tmp_path / "p3.json", 10, 10, 1.0, 1.0, 1.0))
    assert run.returncode == 0 and "alone twotone_heart" in run.stdout and "make demo" not in run.stdout
    missing = _gap("--fast", fast, "--paper-exact", paper[1], _record(tmp_path / "p4.json", 0, 10, 1.0, 1.0, 1.0))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
