"""`cones2-train` end to end: bad inputs exit 2 with one clear line, the embedded model trains a
residual that `cones2-engine generate --subject` uses, and Ctrl-C exits 130 with a resumable checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import cones2
from cones2_train.cli import main


def _image_folder(path: Path, n: int = 3) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (96 + 16 * i, 80), (30 * i, 120, 200))
        ImageDraw.Draw(im).rectangle((10 + 5 * i, 12, 60, 70), fill=(220, 70, 30))
        im.save(path / f"photo{i}.{('png', 'jpg', 'webp')[i % 3]}")
    return path


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLIs set torch's thread count (--threads or the default rule): put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


BAD = {
    # name: (extra argv or a callable building it, expected text in the error line)
    "empty folder": (lambda d, m: ["--images", str(d / "empty")], "no .jpg/.jpeg/.png/.webp images"),
    "unreadable image": (lambda d, m: ["--images", str(d / "broken")], "broken.png"),
    "blank word": (lambda d, m: ["--word", "   "], "word: '   ' tokenizes to nothing"),
    "resolution": (lambda d, m: ["--model", m, "--resolution", "100"], "resolution: 100 px does not suit"),
    "missing model": (lambda d, m: ["--model", str(d / "no-such-model")], "model: model directory not found"),
    "steps": (lambda d, m: ["--steps", "0"], "steps: must be >= 1"),
    "lr zero": (lambda d, m: ["--lr", "0"], "lr: must be > 0"),
    "lr nan": (lambda d, m: ["--lr", "nan"], "lr: must be a finite number"),
    "batch size": (lambda d, m: ["--batch-size", "0"], "batch_size: must be in [1, 64]"),
    "reg": (lambda d, m: ["--reg-rest", "-1"], "reg_rest: must be >= 0"),
    "out suffix": (lambda d, m: ["--out", str(d / "dog.pt")], "out: must end in .safetensors"),
    "templates": (lambda d, m: ["--templates", str(d / "templates.txt")], "templates: templates.txt line 2"),
    "resume": (lambda d, m: ["--resume", str(d / "nothing-here")], "resume: checkpoint not found"),
    "fp16 on cpu": (lambda d, m: ["--device", "cpu", "--dtype", "fp16"], "dtype: fp16 autocast needs a CUDA device"),
}


@pytest.fixture(scope="module")
def bad_inputs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "empty" / "notes.txt").write_text("not an image")
    _image_folder(d / "broken", 1)
    (d / "broken" / "broken.png").write_bytes(b"\x89PNG but not really")
    (d / "templates.txt").write_text("a photo of a {}\na photo without a slot\n")
    _image_folder(d / "good", 2)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_and_exit_2(case, bad_inputs_dir, tiny_model_dir, capsys):
    make, expected = BAD[case]
    d = bad_inputs_dir
    argv = {"--images": str(d / "good"), "--word": "dog", "--out": str(d / "out.safetensors"),
            "--model": str(tiny_model_dir), "--steps": "1", "--resolution": "64"}
    extra = make(d, str(tiny_model_dir))
    argv.update(zip(extra[::2], extra[1::2]))                      # the case's flags override the good ones
    rc, err = _run(capsys, [x for kv in argv.items() for x in kv] + ["--no-progress"])
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cones2-train: error: ") and expected in err, err
    assert not (d / "out.safetensors").exists()


EARLY = [
    (["--threads", "0"], "threads: must be an integer in [1, 1024], got 0"),
    (["--out", "/proc/dog.safetensors"], "out: cannot create files in '/proc'"),
    (["--out", "{d}/afile/dog.safetensors"], "out: cannot write under '{d}/afile': it is a file, not a folder"),
    (["--out", "{d}/adir.safetensors"], "out: is a folder, not a file: '{d}/adir.safetensors'"),
    (["--checkpoint-dir", "{d}/afile"], "checkpoint_dir: is a file, not a folder: '{d}/afile'"),
    (["--checkpoint-dir", "/proc/ck"], "checkpoint_dir: cannot create files in '/proc'"),
    (["--save-encoder", "{d}/afile"], "save_encoder: is a file, not a folder: '{d}/afile'"),
    (["--lr", "-1e-3"], "lr: must be > 0, got -0.001"),
]


@pytest.mark.parametrize("argv,message", EARLY, ids=[m[:40] for _, m in EARLY])
def test_unwritable_outputs_and_bad_flags_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import cones2_train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(trainer, "Trainer", refuse)
    images = _image_folder(tmp_path / "imgs", 1)
    (tmp_path / "afile").write_bytes(b"precious")
    (tmp_path / "adir.safetensors").mkdir()
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    base = ["--images", str(images), "--word", "dog", "--no-progress"]
    if "--out" not in argv:
        base += ["--out", str(tmp_path / "dog.safetensors")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = _run(capsys, base + argv)
    assert rc == 2 and err.startswith(f"cones2-train: error: {message.replace('{d}', str(tmp_path))}"), err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (tmp_path / "afile").read_bytes() == b"precious"


def test_demo_trainer_shares_the_exit_codes(tmp_path, capsys):
    from cones2_train.demo_world.train import main as demo_main

    (tmp_path / "afile").write_bytes(b"x")
    assert demo_main(["--out", str(tmp_path / "afile"), "--smoke"]) == 2
    assert capsys.readouterr().err == (f"python -m cones2_train.demo_world.train: error: out: is a file, not a folder: "
                                       f"'{tmp_path / 'afile'}'\n")
    assert demo_main(["--out", str(tmp_path / "run"), "--smoke", "--threads", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: threads: must be an integer in [1, 1024], got 0\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_console_script_reports_errors_with_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    exe = Path(sys.executable).with_name("cones2-train")
    proc = subprocess.run([str(exe), "--images", str(tmp_path / "empty"), "--word", "dog", "--out",
                           str(tmp_path / "dog.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cones2-train: error: images: no .jpg/.jpeg/.png/.webp images in "
                                               f"{tmp_path / 'empty'}"]


def test_embedded_model_residual_drives_cones2_engine_generate(tmp_path, capsys):
    from cones2.cli import main as engine_main

    images = _image_folder(tmp_path / "dog-photos")
    out = tmp_path / "dog.safetensors"
    assert main(["--images", str(images), "--word", "dog", "--out", str(out), "--steps", "20",
                 "--resolution", "128", "--no-progress", "--profile"]) == 0   # no --model: the embedded default
    printed = capsys.readouterr().out
    assert "wrote" in printed and "unet_backward" in printed and "vae_cache (one-off)" in printed
    residual = cones2.Residual.load(out)
    assert residual.word == "dog" and residual.embedding.shape == (1, 32)

    common = ["generate", "--prompt", "a dog on the grass", "--steps", "4", "--no-progress"]
    with_dog, without = tmp_path / "dog.png", tmp_path / "plain.png"
    assert engine_main(common + ["--subject", f"dog={out}", "--out", str(with_dog),
                                 "--save-latents", str(tmp_path / "dog.lat.safetensors")]) == 0
    assert engine_main(common + ["--out", str(without), "--save-latents", str(tmp_path / "plain.lat.safetensors")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "dog.lat.safetensors"), load_file(tmp_path / "plain.lat.safetensors")
    assert not torch.equal(a["latents"], b["latents"])                    # the residual was used


def test_ctrl_c_exits_130_and_resume_finishes_the_same_residual(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from cones2_train.trainer import Trainer

    images = _image_folder(tmp_path / "imgs")
    common = ["--model", str(tiny_model_dir), "--images", str(images), "--word", "dog", "--steps", "5",
              "--lr", "1e-3", "--resolution", "64", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "full.safetensors")]) == 0

    real_step = Trainer._train_step
    calls = []

    def step_then_ctrl_c(self):
        loss = real_step(self)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", step_then_ctrl_c)
    capsys.readouterr()
    out = tmp_path / "cut.safetensors"
    assert main(common + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "cut.ckpt" / "step-000002"
    assert f"interrupted after step 2/5; resume with --resume {ckpt}" in err
    assert ckpt.is_dir() and not out.exists()
    monkeypatch.setattr(Trainer, "_train_step", real_step)

    assert main(common + ["--out", str(out), "--resume", str(ckpt)]) == 0
    got, want = cones2.Residual.load(out), cones2.Residual.load(tmp_path / "full.safetensors")
    assert torch.equal(got.embedding, want.embedding)
    assert got.metadata["steps"] == "5"
