"""`cones2-engine generate` / `info`: flags, the reference JSON config, outputs, and one-line errors."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cones2
import spec_reference as spec
from cones2.cli import build_parser, main
from cones2.cli.exit_codes import run_cli
from test_engine_vs_reference import _load_parts


@pytest.fixture(autouse=True)
def _restore_threads():
    """`generate` sets torch's thread count (--threads or the default rule): put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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


def test_layout_resize_flag_reaches_the_image_metadata(tmp_path, tiny_model_dir):
    out = tmp_path / "c.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--box", "dog=0.1,0.1,0.6,0.6",
                 "--resolution", "64", "--steps", "1", "--layout-resize", "cell-centres", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads(Image.open(out).text["cones2"])["layout_resize"] == "cell-centres"


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
                         "--negative-weight", "-1e8", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "a.png").size == (128, 64)
    info = subprocess.run([*exe, "info", "--model", str(tiny_model_dir), "--json"], capture_output=True, text=True,
                          timeout=300)
    facts = json.loads(info.stdout)
    assert facts["text_dim"] == 32 and facts["prediction_type"] == "v_prediction" and "sdpa" in facts["backends"]
    bad = subprocess.run([*exe, "generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--steps", "-3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "steps" in bad.stderr


# ---- issue 13: everything checkable answers before the model loads ---------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: these mistakes must be caught before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cones2.Engine, "from_pretrained", refuse)


@pytest.fixture
def files(tmp_path):
    """A residual, a pickle with code, a plain file used as a folder, and a folder named like a PNG."""
    cones2.Residual(torch.zeros(1, 32)).save(tmp_path / "dog.safetensors")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04cbuiltins\nprint\n\x8c\x05owned\x85R.")
    (tmp_path / "existing.png").write_bytes(b"precious")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


EARLY = [
    (["--box", "star=0,0,1,1", "--strength", "star=1e300", "--prompt", "a star"],
     "layout.strengths.star: must be in [0, 10000], got 1e+300"),
    (["--negative-weight=-1e300"], "negative_weight: must be in [-1e+09, 0], got -1e+300"),
    (["--negative-weight", "-inf"], "negative_weight: must be finite, got -inf"),
    (["--cfg", "1e308"], "cfg_scale: must be in [0, 100], got 1e+308"),
    (["--guidance-weight", "11"], "guidance_weight: must be in [0, 10], got 11"),
    (["--guidance-steps", "-1"], "guidance_steps: must be in [0, 1000000], got -1"),
    (["--steps", "0"], "steps: must be in [1, 1000], got 0"),
    (["--resolution", "100"], "height: must be a multiple of 64, got 100"),
    (["--resolution", "0"], "height: must be in [64, 4096], got 0"),
    (["--seed", "-5"], "seed: must be in [0, 9223372036854775807], got -5"),
    (["--threads", "0"], "threads: must be an integer in [1, 1024], got 0"),
    (["--backend", "magic"], "backend: unknown backend 'magic'"),
    (["--backend", "tensorrt"], "backend: 'tensorrt' cannot run on cpu: TensorRT engines run on CUDA only"),
    (["--backend", "sdpa", "--onnx", "{d}"], "onnx: is for --backend onnxruntime, not sdpa"),
    (["--backend", "onnxruntime", "--trt", "{d}"], "trt: is for --backend tensorrt, not onnxruntime"),
    (["--dtype", "fp8"], "dtype: unknown dtype 'fp8'"),
    (["--device", "cuda:0"], "device: CUDA was asked for but no CUDA device is available here"),
    (["--prompt", "dog " * 600], "prompt: is longer than 2000 characters"),
    (["--box", "x" * 5000 + "=0,0,1,1"], "--box: a subject word has at most 100 characters, got 'xxxxxxxx"),
    (["--subject", "dog={d}/dog.safetensors", "--position", "dog=0"], "--position dog: must be in [1, 75], got 0"),
    (["--subject", "dog={d}/dog.safetensors", "--position", "dog=2.5"], "--position dog: must be an integer, got 2.5"),
    (["--subject", "dog={d}/evil.pt"], "--subject dog: cannot read evil.pt: not a plain tensor file"),
    (["--out", "/proc/o.png"], "out: cannot create files in '/proc'"),
    (["--out", "{d}/existing.png/x.png"], "out: cannot write under '{d}/existing.png': it is a file, not a folder"),
    (["--out", "{d}/folder.png"], "out: is a folder, not a file: '{d}/folder.png'"),
    (["--out", "{d}/o.jpg"], "out: must end in .png, got '{d}/o.jpg'"),
    (["--save-latents", "{d}/l.npy"], "save-latents: must end in .safetensors, got '{d}/l.npy'"),
    (["--save-latents", "/proc/l.safetensors"], "save-latents: cannot create files in '/proc'"),
    (["--box", "dog=0,0,1,1", "--preview", "--out", "{d}/folder.preview/x.png"], None),   # fine: a sanity case
]


@pytest.mark.parametrize("argv,message", EARLY, ids=[m[:40] if m else "ok" for _, m in EARLY])
def test_mistakes_answer_before_the_model_loads(files, capsys, no_model_loading, argv, message):
    argv = [a.replace("{d}", str(files)) for a in argv]
    if "--prompt" not in argv:
        argv += ["--prompt", "a dog"]
    if "--out" not in argv:
        argv += ["--out", str(files / "o.png")]
    before = sorted(p.name for p in files.rglob("*"))
    if message is None:                          # valid inputs: the first thing it does is load the model
        with pytest.raises(AssertionError, match="the model was loaded"):
            main(["generate", *argv, "--no-progress"])
        return
    rc = main(["generate", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"cones2-engine generate: error: {message.replace('{d}', str(files))}"), err
    assert len(err.splitlines()) == 1 and len(err) < 300, err
    assert sorted(p.name for p in files.rglob("*")) == before                  # nothing written
    assert (files / "existing.png").read_bytes() == b"precious"


def test_negative_numbers_in_exponent_form_are_values():
    parser = build_parser()
    for text, value in (("-1e8", -1e8), ("-2.5E-3", -2.5e-3), ("-1", -1.0), ("-.5", -0.5), ("-1e+09", -1e9)):
        args = parser.parse_args(["generate", "--negative-weight", text])
        assert args.negative_weight == value
    assert parser.parse_args(["generate", "--steps", "-3"]).steps == -3


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--steps", "many"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == ("cones2-engine generate: error: argument --steps: invalid int value: 'many' "
                   "(see cones2-engine generate --help)\n")


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path, tiny_model_dir):
    old_umask = os.umask(0o027)
    try:
        keep = tmp_path / "old.png"
        keep.write_bytes(b"old")
        keep.chmod(0o644)
        common = ["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--box", "dog=0,0,0.5,1",
                  "--steps", "1", "--resolution", "64", "--threads", "1", "--no-progress"]
        assert main([*common, "--out", str(tmp_path / "new.png"), "--preview",
                     "--save-latents", str(tmp_path / "new.safetensors")]) == 0
        assert main([*common, "--out", str(keep)]) == 0
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"new.png": 0o640, "new.preview.png": 0o640, "new.safetensors": 0o640, "old.png": 0o644}
    assert Image.open(keep).size == (64, 64)
    assert torch.get_num_threads() == 1


# ---- the exit-code wrapper shared by cones2-engine, cones2-train and the demo trainer -----------------
def _raise(exc):
    def run():
        raise exc
    return run


@pytest.mark.parametrize("exc,code,line", [
    (cones2.Cones2Error("must be finite", "cfg_scale"), 2, "prog: error: cfg_scale: must be finite"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "prog: error: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/o.png"), 2, "prog: error: Permission denied: /x/o.png"),
    (KeyboardInterrupt(), 130, "prog: stopped"),
    (KeyboardInterrupt("training interrupted after step 2/5; resume with --resume ck"), 130,
     "prog: training interrupted after step 2/5; resume with --resume ck"),
])
def test_exit_codes(capsys, exc, code, line):
    assert run_cli("prog", _raise(exc), interrupted="stopped") == code
    assert capsys.readouterr().err == line + "\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(RuntimeError):
        run_cli("prog", _raise(RuntimeError("a bug")))
    with pytest.raises(OSError):                 # an OS error about no user path is a bug too
        run_cli("prog", _raise(OSError(errno.EBADF, "Bad file descriptor")))
    assert run_cli("prog", lambda: None) == 0 and run_cli("prog", lambda: 3) == 3


@pytest.mark.parametrize("out,message", [
    ("/proc/onnx", "out: cannot create files in '/proc'"),
    ("{d}/existing.png/onnx", "out: cannot write under '{d}/existing.png': it is a file, not a folder"),
    ("{d}/existing.png", "out: {d}/existing.png exists and is not empty (pass --overwrite to replace it)"),
])
def test_export_folder_is_checked_before_the_model_loads(files, capsys, no_model_loading, out, message):
    out = out.replace("{d}", str(files))
    assert main(["export", "onnx", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cones2-engine export: error: {message.replace('{d}', str(files))}")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert (files / "existing.png").read_bytes() == b"precious"
