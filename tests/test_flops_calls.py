"""The work table (bench/flops.py, issue 24 item 1) against the code: UNet passes of each mode and
setting counted on the tiny model by hooks on the UNet's own modules (what actually ran), compared
with hand-written counts and with what bench/flops.py reports for the same settings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import cones2

BENCH = Path(__file__).resolve().parents[1] / "bench"
PROMPT = "a dog and a mug on the beach"
LAYOUT = {"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.4, 0.95, 0.95)}
# (SamplingConfig fields, expected (CFG-pair full, conditional-only full, CFG-pair shallow, conditional-only shallow))
CASES = [
    (dict(mode="paper-exact"), (100, 0, 0, 0)),                                   # 50 steps, each guided twice
    (dict(mode="paper-exact", steps=30, guidance_steps=15), (45, 0, 0, 0)),
    (dict(mode="fast", steps=20, guidance_steps=12, gate_step=20, cache_interval=1), (32, 0, 0, 0)),
    (dict(mode="fast"), (10, 1, 3, 0)),                                           # defaults: 11 / 3 / 10 / 2
    (dict(mode="fast", steps=10, guidance_steps=4, gate_step=5), (9, 3, 0, 2)),   # with a conditional tail
    (dict(mode="fast", steps=10, guidance_steps=2, gate_step=10, cache_interval=3), (7, 0, 5, 0)),
    (dict(mode="fast", steps=4, guidance_steps=1, gate_step=2, cache_interval=2), (3, 1, 0, 1)),
]
# bench/flops.py's own run is slow (module tracking on every op): a short paper-exact loop and a short fast
# plan with every kind of pass (guided, the CFG pass that records the cross-attention, conditional-only
# full and shallow)
FLOPS_CASES = [(dict(mode="paper-exact", steps=2, guidance_steps=1), (3, 0, 0, 0)), CASES[-1]]


def _count_passes(engine, fields):
    """Generate once; classify every UNet pass from hooks: the last up block runs in every pass, the
    mid block only in full ones; the batch says CFG pair (2) or conditional only (1)."""
    unet, seen = engine.unet, []
    hooks = [unet.up_blocks[-1].register_forward_pre_hook(lambda m, a, k: seen.append([k["hidden_states"].shape[0],
                                                                                         "shallow"]), with_kwargs=True),
             unet.mid_block.register_forward_pre_hook(lambda m, a: seen.append("mid"))]
    try:
        engine.generate(PROMPT, None, cones2.Layout.from_boxes(LAYOUT), height=64, width=64, progress=False, **fields)
    finally:
        for h in hooks:
            h.remove()
    passes = []
    for item in seen:
        if item == "mid":
            passes.append(None)
        elif passes and passes[-1] is None:
            passes[-1] = (item[0], "full")
        else:
            passes.append((item[0], "shallow"))
    return passes


@pytest.mark.parametrize("fields,expected", CASES)
def test_unet_passes_per_mode(tiny_engine, fields, expected):
    passes = _count_passes(tiny_engine, fields)
    counts = tuple(passes.count(kind) for kind in ((2, "full"), (1, "full"), (2, "shallow"), (1, "shallow")))
    assert counts == expected
    # the plan the sampler follows, the basis of bench/flops.py's table, says the same
    config = cones2.SamplingConfig(height=64, width=64, **fields)
    from cones2.reuse import StepPlan

    plan = StepPlan.make(config.steps, config.guidance_steps, config.gate_step, config.cache_interval)
    assert passes == [(2 if cfg else 1, depth) for _, cfg, depth in plan.unet_passes()]


def test_flops_script_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """bench/flops.py on the tiny model's configs: its pass counts are the hooks' counts, paper-exact's
    UNet work is its pass count in calls (guided passes cost a little more: the logit std), and
    reuse costs less than it."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    for name in ("unet", "vae", "text_encoder"):
        (config_dir / f"{name}.json").write_text((tiny_model_dir / name / "config.json").read_text())
    (config_dir / "scheduler.json").write_text((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    monkeypatch.syspath_prepend(str(BENCH))
    import flops

    monkeypatch.setitem(flops.SHAPES, "tiny", (config_dir, 64))
    cases = FLOPS_CASES
    out = tmp_path / "flops.json"
    extra = [["--setting", f"{f['mode']}:" + ",".join(f"{k}={v}" for k, v in f.items() if k != "mode")]
             for f, _ in cases]
    argv = ["--shapes", "tiny", "--subjects", "2", "--only", "--json", str(out), "--files", "flops.log"]
    assert flops.main(argv + sum(extra, [])) == 0
    record = json.loads(out.read_text())
    assert record["files"] == ["flops.log"] and "files" not in record["settings"]   # the run's log, listed
    rows = record["payload"]["tiny"]["rows"]
    assert record["command"].startswith("python bench/flops.py --shapes tiny")      # a results record
    assert len(rows) == len(cases)
    for row, (_, expected) in zip(rows, cases):
        assert row["unet_passes"] == sum(expected)
    exact, reused = rows
    assert exact["unet_passes"] <= exact["unet_calls"] <= 1.05 * exact["unet_passes"]
    assert reused["unet_calls"] < reused["unet_passes"] - 2 * 0.4        # 2 conditional-only, 1 of them shallow
    assert reused["total_calls"] > reused["unet_calls"]                  # text encoder and VAE counted on top
    sys.modules.pop("flops", None)
