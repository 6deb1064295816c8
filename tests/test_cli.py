"""`cones2-engine generate` / `info`: flags, the reference JSON config, outputs, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import spec_reference as spec
from cones2.cli import main
from test_engine_vs_reference import _load_parts


def _write_reference_config(folder, dim):
    """A config in the reference implementation's format, with its residual .pt files and layout PNG."""
    (folder / "residuals").mkdir()
    g = torch.Generator().manual_seed(0)
    residuals = {"mug": 0.3 * torch.randn(1, dim, generator=g), "dog": 0.3 * torch.randn(dim, generator=g)}
    for name, t in residuals.items():
        torch.save(t, folder / "residuals" / f"{name}.pt")
    layout = np.zeros((96, 96, 3), dtype=np.uint8)          # not the output size: resized (nearest)
    layout[10:60, 5:45] = (255, 192, 0)
    layout[30:90, 50:94] = (255, 0, 0)
    Image.fromarray(layout).save(folder / "layout.png")
    config = [{
        "prompt": "a mug and a dog on the beach",
        "residual_dict": {"dog": "residuals/dog.pt", "mug": "residuals/mug.pt", "lake": "residuals/lake.pt"},
        "color_context": {"255,192,0": ["mug", 2.5], "255,0,0": ["dog", 2.0]},
        "guidance_steps": 50, "guidance_weight": 0.08, "weight_negative": -1e8,
        "layout": "layout.png", "subject_list": [["mug", 2], ["dog", 5]],
    }]
    (folder / "config.json").write_text(json.dumps(config))
    return residuals, layout


def test_reference_config_matches_spec_reference(tmp_path, tiny_model_dir):
    dim = 32
    residuals, layout = _write_reference_config(tmp_path, dim)
    out = tmp_path / "out" / "img.png"
    rc = main(["generate", "--config", str(tmp_path / "config.json"), "--model", str(tiny_model_dir),
               "--resolution", "128", "--steps", "3", "--out", str(out), "--save-latents", str(tmp_path / "l.safetensors"),
               "--preview", "--no-progress"])
    assert rc == 0
    saved = load_file(tmp_path / "l.safetensors")
    assert set(saved) == {"latents", "cond_embeddings"}

    parts, prediction, betas = _load_parts(tiny_model_dir)
    big = np.asarray(Image.fromarray(layout).resize((128, 128), Image.NEAREST))
    regions = {"mug": (torch.from_numpy((big == (255, 192, 0)).all(-1)), 2.5),
               "dog": (torch.from_numpy((big == (255, 0, 0)).all(-1)), 2.0)}
    with torch.no_grad():
        ref = spec.reference_generate(**parts, prediction_type=prediction, prompt="a mug and a dog on the beach",
                                      residuals={k: v.reshape(1, dim) for k, v in residuals.items()},
                                      positions={"mug": [2], "dog": [5]}, regions=regions, seed=0, steps=3,
                                      guidance_steps=3, guidance_weight=0.08, cfg_scale=7.5, negative_weight=-1e8,
                                      height=128, width=128, **betas)
    torch.testing.assert_close(saved["cond_embeddings"], ref["cond_embeddings"], rtol=0, atol=1e-6)
    torch.testing.assert_close(saved["latents"], ref["latents"], rtol=1e-4, atol=1e-4)

    meta = json.loads(Image.open(out).text["cones2"])
    assert meta["prompt"] == "a mug and a dog on the beach" and meta["seed"] == 0 and meta["steps"] == 3
    assert Image.open(out.with_suffix(".preview.png")).size == (256, 256)  # small images are enlarged


BAD = [
    (["--prompt", "a dog", "--box", "dog=0,0,2,1"], "layout.boxes.dog"),
    (["--prompt", "a dog", "--box", "dog=0.5,0,0.2,1"], "inverted"),
    (["--prompt", "a dog", "--box", "cat=0,0,1,1"], "'cat' does not occur"),
    (["--prompt", "a dog", "--box", "dog=0,0,1"], "expected 4 numbers"),
    (["--prompt", "a dog", "--subject", "dog=missing.safetensors"], "file not found"),
    (["--prompt", "a dog", "--subject", "dog"], "NAME=VALUE"),
    (["--prompt", "a dog", "--steps", "0"], "steps"),
    (["--prompt", "a dog", "--resolution", "100"], "multiple of 64"),
    (["--prompt", "a dog", "--guidance-weight", "nan"], "finite"),
    (["--prompt", "a dog", "--cfg", "inf"], "finite"),
    (["--prompt", "   "], "prompt"),
    (["--prompt", "a dog", "--dtype", "fp8"], "dtype"),
    (["--prompt", "a dog", "--backend", "magic"], "unknown"),
    (["--prompt", "a dog", "--device", "cuda:0"], "CUDA"),
    (["--prompt", "a dog", "--model", "/nonexistent/sd21"], "model directory not found"),
    (["--prompt", "a dog", "--out", "x.jpg"], "must end in .png"),
    (["--config", "nope.json"], "file not found"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message, tiny_model_dir):
    defaults = {"--model": str(tiny_model_dir), "--steps": "1", "--out": str(tmp_path / "o.png")}
    for flag, value in defaults.items():
        if flag not in argv:
            argv = [*argv, flag, value]
    rc = main(["generate", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_existing_output_survives_a_failed_run(tmp_path, tiny_model_dir):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    assert main(["generate", "--prompt", "a dog", "--box", "cat=0,0,1,1", "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 2
    assert out.read_bytes() == b"precious"


def test_console_script_and_info(tmp_path, tiny_model_dir):
    """The installed `cones2-engine` entry point: a run, `info --json`, and an error's exit code."""
    exe = [str(Path(sys.executable).parent / "cones2-engine")]
    ok = subprocess.run([*exe, "generate", "--model", str(tiny_model_dir), "--prompt", "a dog and a mug",
                         "--box", "dog=0,0,0.5,1", "--box", "mug=0.5,0,1,1", "--strength", "mug=3",
                         "--steps", "2", "--height", "64", "--width", "128", "--out", str(tmp_path / "a.png"),
                         "--no-progress"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "a.png").size == (128, 64)
    info = subprocess.run([*exe, "info", "--model", str(tiny_model_dir), "--json"], capture_output=True, text=True,
                          timeout=300)
    facts = json.loads(info.stdout)
    assert facts["text_dim"] == 32 and facts["prediction_type"] == "v_prediction" and "sdpa" in facts["backends"]
    bad = subprocess.run([*exe, "generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--steps", "-3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "steps" in bad.stderr
