"""Validation at the edge (issue 13): every number finite and in its documented range, every size
bounded, messages one short line that names the field and quotes a bounded prefix of the value.
The same objects (`SamplingConfig`, `Layout`, `GenerationRequest`) are what the CLI, the Python API
and gRPC build, so these checks hold for all three."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cones2
from cones2 import limits
from cones2.config import SamplingConfig
from cones2.errors import QUOTE_LIMIT

HUGE = "x" * 10_000


def _error(fn, *args, **kwargs) -> cones2.Cones2Error:
    with pytest.raises(cones2.Cones2Error) as info:
        fn(*args, **kwargs)
    return info.value


# ---- SamplingConfig -------------------------------------------------------------------------------
FLOAT_CASES = [
    ("guidance_weight", 1e300, "must be in [0, 10]"), ("guidance_weight", -0.01, "must be in [0, 10]"),
    ("guidance_weight", float("inf"), "must be finite"), ("guidance_weight", float("nan"), "must be finite"),
    ("cfg_scale", 1e308, "must be in [0, 100]"), ("cfg_scale", 100.5, "must be in [0, 100]"),
    ("cfg_scale", -1.0, "must be in [0, 100]"), ("cfg_scale", float("-inf"), "must be finite"),
    ("negative_weight", -1e300, "must be in [-1e+09, 0]"), ("negative_weight", -3.5e38, "must be in [-1e+09, 0]"),
    ("negative_weight", 1.0, "must be in [-1e+09, 0]"), ("negative_weight", float("nan"), "must be finite"),
    ("guidance_weight", "0.1", None), ("cfg_scale", "seven", "must be a number"),
    ("cfg_scale", True, "must be a number"),
    ("cfg_scale", 10**400, "must be a number"),
]


@pytest.mark.parametrize("field,value,message", FLOAT_CASES, ids=[f"{f}={v!r}"[:40] for f, v, _ in FLOAT_CASES])
def test_sampling_floats_are_finite_and_bounded(field, value, message):
    if message is None:                          # a numeric string is a number (JSON configs, CLI)
        assert getattr(SamplingConfig(**{field: value}), field) == float(value)
        return
    err = _error(SamplingConfig, **{field: value})
    assert err.field == field and str(err).startswith(f"{field}: {message}")
    assert "\n" not in str(err) and len(str(err)) < 120


def test_documented_defaults_and_reference_values_are_valid():
    c = SamplingConfig()
    assert (c.guidance_weight, c.cfg_scale, c.negative_weight, c.steps) == (0.08, 7.5, -1e8, 50)
    for g in (0.0, 0.05, 0.08, 0.1, 10.0):                 # SPEC 3: sensible 0.05..0.10
        assert SamplingConfig(guidance_weight=g).guidance_weight == g
    for cfg in (0.0, 1.0, 7.5, 100.0):
        assert SamplingConfig(cfg_scale=cfg).cfg_scale == cfg
    for w in (0.0, -1e4, -1e8, -1e9):                      # -1e8: the reference's weight_negative
        assert SamplingConfig(negative_weight=w).negative_weight == w


@pytest.mark.parametrize("kwargs,field,message", [
    ({"steps": 0}, "steps", "must be in [1, 1000], got 0"),
    ({"steps": 1001}, "steps", "must be in [1, 1000], got 1001"),
    ({"steps": 2.5}, "steps", "must be an integer, got 2.5"),
    ({"steps": 1e300}, "steps", "must be in [1, 1000], got 1000000000000000052504760255204420248704468581108159154"),
    ({"height": 100}, "height", "must be a multiple of 64, got 100"),
    ({"width": 8192}, "width", "must be in [64, 4096], got 8192"),
    ({"seed": -1}, "seed", "must be in [0, 9223372036854775807], got -1"),
    ({"mode": HUGE}, "mode", "must be one of paper-exact, fast, got 'xxxxx"),
    ({"layout_resize": HUGE}, "layout_resize", "must be one of aligned-corners, cell-centres, got 'xxxxx"),
])
def test_sampling_integers_and_mode(kwargs, field, message):
    err = _error(SamplingConfig, **kwargs)
    assert err.field == field and str(err).startswith(f"{field}: {message}")
    assert len(str(err)) < 160


# ---- Layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength,message", [
    (1e300, "must be in [0, 10000], got 1e+300"), (-1.0, "must be in [0, 10000], got -1"),
    (float("inf"), "must be finite, got inf"), ("strong", "must be a number, got 'strong'"),
])
def test_strengths_are_bounded(strength, message):
    err = _error(cones2.Layout.from_boxes, {"star": (0, 0, 1, 1)}, {"star": strength})
    assert str(err) == f"layout.strengths.star: {message}"


def test_strength_bounds_include_the_defaults():
    layout = cones2.Layout.from_boxes({"a": (0, 0, 1, 1), "b": (0, 0, 1, 1), "c": (0, 0, 1, 1)},
                                      {"a": 0.0, "b": 1e4})
    assert [r.strength for r in layout.regions.values()] == [0.0, 1e4, 2.5]


def test_layout_sizes_are_bounded():
    err = _error(cones2.Layout.from_boxes, {HUGE: (0, 0, 1, 1)})
    assert err.field == "layout.boxes" and f"at most {limits.MAX_NAME_CHARS} characters" in str(err)
    assert len(str(err)) < 200                              # the 10,000-character name is not echoed
    err = _error(cones2.Layout.from_boxes, {f"s{i}": (0, 0, 1, 1) for i in range(9)})
    assert str(err) == "layout: 9 subjects; at most 8 per image"
    err = _error(cones2.Layout.from_boxes, {"dog": (0, 0, 5000, 10)}, units="pixels")
    assert str(err) == "layout.boxes.dog: pixel coordinates must be integers in [0, 4096], got [0.0, 0.0, 5000.0, 10.0]"
    err = _error(cones2.Layout.from_boxes, {"dog": [0.5] * 100_000})
    assert err.field == "layout.boxes.dog" and len(str(err)) < 200
    err = _error(cones2.Layout.from_masks, {"dog": torch.ones(5000, 8, dtype=torch.bool)})
    assert str(err) == "layout.masks.dog: mask sides must be at most 4096, got (5000, 8)"


def test_colour_table_is_bounded(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "l.png")
    table = {f"{i},0,0": ("dog", 2.5) for i in range(65)}
    err = _error(cones2.Layout.from_color_map, tmp_path / "l.png", table)
    assert str(err) == "layout.colors: 65 colours; at most 64"
    err = _error(cones2.Layout.from_color_map, tmp_path / "l.png", {"1,2,3": ("dog", 1e300)})
    assert str(err) == "layout.colors.1,2,3: must be in [0, 10000], got 1e+300"


# ---- GenerationRequest: names and positions -----------------------------------------------------------
def test_request_names_and_positions_are_bounded():
    r = cones2.Residual(torch.zeros(1, 32))
    err = _error(cones2.GenerationRequest, "a dog", {HUGE: r})
    assert err.field == "subjects" and len(str(err)) < 200
    err = _error(cones2.GenerationRequest, "a dog", {"dog": r}, subject_positions={"dog": list(range(1, 100_001))})
    assert str(err) == "subject_positions.dog: needs 1 to 75 token positions, got 100000"
    err = _error(cones2.GenerationRequest, "a dog", {"dog": r}, subject_positions={"dog": [2, 76]})
    assert str(err) == "subject_positions.dog: must be in [1, 75], got 76"
    err = _error(cones2.GenerationRequest, "a dog", {"dog": r}, subject_positions={HUGE: [2]})
    assert err.field == "subject_positions" and len(str(err)) < 200
    assert len(str(_error(cones2.GenerationRequest, "dog " * 1000))) < 80        # prompt: length only


def test_quote_keeps_a_bounded_prefix():
    from cones2.errors import quote

    assert quote("dog") == "'dog'"
    q = quote(HUGE)
    assert q.startswith("'xxx") and q.endswith("... (10002 chars)") and len(q) == QUOTE_LIMIT + len("... (10002 chars)")


# ---- the model-dependent checks (Engine.check) --------------------------------------------------------
def test_subject_past_the_token_limit_says_so(tiny_engine):
    prompt = "a photo of " + "a very very red and shiny " * 14 + "star"      # start, 3 + 14 * 6 words: 'star' is 88
    err = _error(tiny_engine.generate, prompt, layout=cones2.Layout.from_boxes({"star": (0, 0, 1, 1)}),
                 steps=1, height=64, width=64)
    assert str(err) == ("layout.star: subject 'star' lies past the prompt's 77-token limit (it starts at token 88; "
                        "the text encoder reads tokens 1..75 only): move it earlier or shorten the prompt")
    err = _error(tiny_engine.generate, "a dog", layout=cones2.Layout.from_boxes({"star": (0, 0, 1, 1)}),
                 steps=1, height=64, width=64)
    assert str(err) == "layout.star: subject 'star' does not occur in the prompt"


def test_token_limit_without_the_prompt_text(tiny_engine):
    """Called with token ids alone, a prompt that fills all 77 tokens gets the cut-off hint."""
    from cones2.tokens import locate_subject, prompt_token_ids

    tok = tiny_engine.tokenizer
    full = prompt_token_ids(tok, "a photo of " + "a very very red and shiny " * 14 + "star")
    err = _error(locate_subject, tok, full, "star")
    assert "does not occur in the first 75 tokens of the prompt (the prompt fills all 77 tokens" in str(err)
    err = _error(locate_subject, tok, prompt_token_ids(tok, "a dog"), "star")
    assert str(err) == "subjects.star: subject 'star' does not occur in the prompt"


# ---- the reference JSON config ---------------------------------------------------------------------------
@pytest.mark.parametrize("patch,field", [
    ({"residual_dict": {"dog": 5}}, "config.residual_dict"),
    ({"subject_list": "dog"}, "config.subject_list"),
    ({"subject_list": [[HUGE, 2]]}, "config.subject_list"),
    ({"layout": 7, "color_context": {}}, "config.layout"),
])
def test_reference_config_values_are_checked(tmp_path, patch, field):
    from cones2.cli.reference_config import load_reference_config

    config = {"prompt": "a dog", "residual_dict": {}} | patch
    (tmp_path / "c.json").write_text(json.dumps([config]))
    err = _error(load_reference_config, tmp_path / "c.json")
    assert err.field == field and len(str(err)) < 200


def test_reference_config_size_is_bounded(tmp_path):
    from cones2.cli.reference_config import MAX_CONFIG_BYTES, load_reference_config

    path = Path(tmp_path / "big.json")
    path.write_text(" " * (MAX_CONFIG_BYTES + 1))
    assert "is over 1048576 bytes" in str(_error(load_reference_config, path))
