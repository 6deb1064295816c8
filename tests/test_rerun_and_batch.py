"""Issue 26, items 3, 5, 6, 7: images re-run from their own PNG, seeds and batches from the CLI, colour
maps and dry runs from `generate`, and what the command says while it works."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import cones2
from cli_support import cli
from cones2.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _meta(path):
    with Image.open(path) as im:
        return json.loads(im.text["cones2"]), im.text["parameters"], np.asarray(im.convert("RGB"))


def test_an_image_re_runs_pixel_identically_from_its_png(tmp_path, tiny_model_dir, tiny_eps_model_dir, tiny_engine):
    (tmp_path / "res").mkdir()
    dog = tmp_path / "res" / "dog.safetensors"
    cones2.Residual(0.2 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), word="dog",
                    metadata={"base_fingerprint": tiny_engine.fingerprint}).save(dog)
    first = tmp_path / "first.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog and a mug", "--subject", f"dog={dog}",
                 "--box", "dog=0,16,64,64", "--box", "mug=64,0,128,32", "--box-units", "pixels", "--strength", "mug=3",
                 "--negative-prompt", "blurry", "--seed", "7", "--steps", "2", "--guidance-steps", "1",
                 "--height", "64", "--width", "128", "--backend", "sdpa", "--out", str(first), "--no-progress"]) == 0
    meta, a1111, pixels = _meta(first)
    assert meta["residuals"]["dog"] == {"word": "dog", "file": "dog.safetensors", "rows": 1, "dim": 32,
                                        "sha256": cones2.Residual.load(dog).sha256,
                                        "base_fingerprint": tiny_engine.fingerprint}
    assert meta["layout"]["regions"]["mug"] == {"strength": 3.0, "pixel_box": [64, 0, 128, 32]}
    assert (meta["model_fingerprint"], meta["backend"], meta["negative_prompt"]) == (tiny_engine.fingerprint, "sdpa",
                                                                                     "blurry")
    assert set(meta["versions"]) == {"cones2", "torch", "diffusers", "transformers"}
    assert a1111.startswith("a dog and a mug\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7.5, "
                            f"Seed: 7, Size: 128x64, Model hash: {tiny_engine.fingerprint}")

    # the residual is not beside the image: one line naming it; with --residual-dir, the same pixels
    again = tmp_path / "again.png"
    missing = cli("generate", "--from-png", first, "--out", again, "--no-progress")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "from-png.residuals.dog: residual dog.safetensors with sha256" in missing.stderr
    assert main(["generate", "--from-png", str(first), "--residual-dir", str(tmp_path / "res"),
                 "--out", str(again), "--no-progress"]) == 0
    meta2, _, pixels2 = _meta(again)
    assert np.array_equal(pixels, pixels2)
    assert {k: v for k, v in meta2.items() if k != "model_source"} == {k: v for k, v in meta.items()
                                                                       if k != "model_source"}

    # another model: one line naming both
    other = cli("generate", "--from-png", first, "--residual-dir", tmp_path / "res", "--model", tiny_eps_model_dir,
                "--out", tmp_path / "x.png", "--no-progress", "--backend", "sdpa")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert f"the image was made with model {meta['model']} (fingerprint {tiny_engine.fingerprint})" in other.stderr
    assert not (tmp_path / "x.png").exists()


def test_flags_override_a_png(tmp_path, tiny_model_dir):
    first = tmp_path / "a.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--box", "dog=0,0,0.5,1",
                 "--seed", "1", "--steps", "2", "--resolution", "64", "--out", str(first), "--no-progress"]) == 0
    second = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(first), "--seed", "2", "--cfg", "5", "--out", str(second),
                 "--no-progress"]) == 0
    meta1, meta2 = _meta(first)[0], _meta(second)[0]
    assert (meta2["seed"], meta2["cfg_scale"], meta2["steps"], meta2["layout"]) == (2, 5.0, 2, meta1["layout"])


@pytest.mark.parametrize("make", ["boxes", "pixels", "masks", "color_map"])
def test_layout_description_round_trips(make):
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:30, 10:50] = True
    colors = np.zeros((40, 60, 3), dtype=np.uint8)
    colors[mask] = (255, 0, 0)
    layout = {"boxes": lambda: cones2.Layout.from_boxes({"a": (0.1, 0.2, 0.6, 0.9), "b": (0, 0, 1, 0.5)}, {"b": 4}),
              "pixels": lambda: cones2.Layout.from_boxes({"a": (3, 4, 50, 60)}, units="pixels"),
              "masks": lambda: cones2.Layout.from_masks({"a": mask}, 1.5),
              "color_map": lambda: cones2.Layout.from_color_map(colors, {"255,0,0": ("a", 2.0)})}[make]()
    described = json.loads(json.dumps(layout.describe()))
    back = cones2.Layout.from_description(described)
    assert back.describe() == described
    for (name, m), m2 in zip(layout.masks(64, 128).items(), back.masks(64, 128).values()):
        assert torch.equal(m, m2) and back.regions[name].strength == layout.regions[name].strength
    assert ("color_map_sha256" in described) == (make == "color_map")


def test_seed_lists_and_num_images_batch_and_print_every_seed(tmp_path, tiny_model_dir, capsys):
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--box", "dog=0,0,0.5,1",
            "--steps", "2", "--resolution", "64", "--no-progress"]
    assert main([*base, "--seed", "3,5-6", "--out", str(tmp_path / "b.png")]) == 0
    printed = capsys.readouterr().out
    for seed in (3, 5, 6):
        assert f"seed {seed}: {tmp_path / f'b-{seed}.png'}" in printed
        assert _meta(tmp_path / f"b-{seed}.png")[0]["seed"] == seed
    assert main([*base, "--seed", "5", "--out", str(tmp_path / "one.png")]) == 0
    alone, batched = _meta(tmp_path / "one.png")[2].astype(int), _meta(tmp_path / "b-5.png")[2].astype(int)
    assert np.abs(alone - batched).max() <= 1          # the batch gives each image what it gives alone
    assert main([*base, "--seed", "10", "--num-images", "2", "--out", str(tmp_path / "n.png")]) == 0
    assert [_meta(tmp_path / f"n-{s}.png")[0]["seed"] for s in (10, 11)] == [10, 11]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "d.png")]) == 0
    assert "seed 0: " in capsys.readouterr().out


def test_color_map_flags_and_dry_run(tmp_path, tiny_model_dir, capsys):
    colors = np.zeros((64, 64, 3), dtype=np.uint8)
    colors[:, 32:] = (255, 0, 0)
    Image.fromarray(colors).save(tmp_path / "map.png")
    out = tmp_path / "c.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--color-map",
                 str(tmp_path / "map.png"), "--color", "255,0,0=dog:3", "--resolution", "64", "--dry-run",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "nothing generated (--dry-run)" in printed.out and not out.exists()
    assert "loading: " in printed.err          # the elapsed-time bar while the model loads
    preview = np.asarray(Image.open(tmp_path / "c.preview.png").convert("RGB")).astype(int)
    left, right = preview[preview.shape[0] // 2, 10], preview[preview.shape[0] // 2, -40]
    assert list(left) == [128, 128, 128] and list(right) != [128, 128, 128]   # tinted where the grid sees "dog"

    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a dog", "--color-map",
                 str(tmp_path / "map.png"), "--color", "255,0,0=dog:3", "--resolution", "64", "--steps", "1",
                 "--out", str(out), "--no-progress"]) == 0
    region = _meta(out)[0]["layout"]["regions"]["dog"]
    assert region["strength"] == 3.0 and "mask_sha256" in region
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("loading ") and re.match(r"loaded .* in \d+\.\d\ds \(weights", lines[1])
    assert re.search(r"load \d+\.\d\ds, export \d+\.\d\ds, sampling \d+\.\d\ds, decode \d+\.\d\ds, total \d+\.\d\ds",
                     lines[-1])
