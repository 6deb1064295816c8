"""Negative prompts (issue 26, item 1): the unconditional branch encodes `negative_prompt`; an empty
one is SPEC 2's U = E("") bit for bit. Checked against the independent SPEC reference."""
from __future__ import annotations

import json

import torch
from PIL import Image

import cones2
import spec_reference as spec
from cli_support import cli
from test_engine_vs_reference import _box_mask, _load_parts

NEGATIVE = "a blurry red square"


def _run(engine, **kw):
    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.3, 0.5, 0.95)})
    return engine.generate("a dog on the beach", None, layout, seed=2, steps=3, guidance_steps=2, height=64, width=64,
                           backend="reference", progress=False, **kw)


def test_negative_prompt_matches_spec_reference(tiny_engine, tiny_model_dir):
    parts, prediction, betas = _load_parts(tiny_model_dir)
    with torch.no_grad():
        ref = spec.reference_generate(**parts, prediction_type=prediction, prompt="a dog on the beach", residuals={},
                                      positions=None, regions={"dog": (_box_mask((0.05, 0.3, 0.5, 0.95), 64, 64), 2.5)},
                                      seed=2, steps=3, guidance_steps=2, guidance_weight=0.08, cfg_scale=7.5,
                                      negative_weight=-1e8, height=64, width=64, negative_prompt=NEGATIVE, **betas)
    result = _run(tiny_engine, negative_prompt=NEGATIVE)
    scale = ref["latents"].abs().max().item()
    assert (result.latents - ref["latents"]).abs().max().item() <= 2e-5 * max(scale, 1.0)
    assert result.parameters()["negative_prompt"] == NEGATIVE


def test_empty_negative_prompt_is_bit_exact_and_a_real_one_changes_the_image(tiny_engine):
    plain = _run(tiny_engine).latents
    assert torch.equal(_run(tiny_engine, negative_prompt="").latents, plain)
    assert (_run(tiny_engine, negative_prompt=NEGATIVE).latents - plain).abs().max() > 1e-3


def test_negative_prompt_type_is_checked(tiny_engine):
    import pytest

    with pytest.raises(cones2.Cones2Error, match="^negative_prompt: must be a string"):
        tiny_engine.request("a dog", negative_prompt=3)


def test_cli_negative_prompt_is_used_and_recorded(tmp_path, tiny_model_dir):
    out = tmp_path / "neg.png"
    proc = cli("generate", "--model", tiny_model_dir, "--prompt", "a dog", "--negative-prompt", NEGATIVE,
               "--resolution", 64, "--steps", 2, "--backend", "sdpa", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        meta, a1111 = json.loads(im.text["cones2"]), im.text["parameters"]
    assert meta["negative_prompt"] == NEGATIVE
    assert a1111.splitlines()[:2] == ["a dog", f"Negative prompt: {NEGATIVE}"]
    assert "Steps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 64x64" in a1111
