"""Issue 26, item 7: `cones2-train` on the embedded demo model uses the documented demo preset
(docs/training.md) instead of SPEC 1's SD recipe, says so, and explicit flags still win."""
from __future__ import annotations

import pytest

from cones2.default_model import shipped_demo_model
from cones2_train.cli import PRESETS, apply_preset, build_parser

BASE = ["--images", "imgs", "--word", "heart", "--out", "h.safetensors"]


@pytest.mark.skipif(shipped_demo_model() is None, reason="this build carries no demo model")
def test_demo_model_defaults_to_the_demo_preset(monkeypatch):
    monkeypatch.delenv("CONES2_DEFAULT_MODEL", raising=False)
    args = build_parser().parse_args(BASE)
    assert apply_preset(args) == "demo"
    assert (args.steps, args.lr, args.train_prompt) == (600, 3e-4, "a {}")
    explicit = build_parser().parse_args([*BASE, "--model", str(shipped_demo_model()), "--steps", "50"])
    assert apply_preset(explicit) == "demo" and (explicit.steps, explicit.lr) == (50, 3e-4)


def test_other_models_keep_the_sd_recipe(tiny_model_dir):
    args = build_parser().parse_args([*BASE, "--model", str(tiny_model_dir)])
    assert apply_preset(args) == "sd" and (args.steps, args.lr, args.train_prompt) == (4000, 5e-6, "{}")
    chosen = build_parser().parse_args([*BASE, "--model", str(tiny_model_dir), "--preset", "demo", "--lr", "1e-3"])
    assert apply_preset(chosen) == "demo" and (chosen.steps, chosen.lr) == (PRESETS["demo"]["steps"], 1e-3)
