"""Issue 26, item 8: the example config the README names ships and runs on the embedded demo model;
`make demo` shows progress (no --no-progress)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import cli
from cones2.default_model import shipped_demo_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shipped_demo_model() is None, reason="this build carries no demo model")
def test_example_config_checks_out_on_the_demo_model(tmp_path):
    env = {"CONES2_DEFAULT_MODEL": None}      # the shipped demo model, not the suite's tiny one
    proc = cli("generate", "--config", ROOT / "docs/examples/guidance_config_example.json", "--dry-run", "--no-progress",
               "--out", tmp_path / "ex.png", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "nothing generated (--dry-run)" in proc.stdout and "16 guided" not in proc.stdout
    assert "50 steps (15 guided)" in proc.stdout and (tmp_path / "ex.preview.png").is_file()
    config = json.loads((ROOT / "docs/examples/guidance_config_example.json").read_text())[0]
    assert set(config["residual_dict"]) == {"heart", "triangle"}


def test_make_demo_shows_progress():
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):].split("\n\n")[0]
    assert "generate" in demo and "--no-progress" not in demo
