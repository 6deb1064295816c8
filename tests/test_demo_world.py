"""The demo world (issue 7): deterministic scenes whose boxes match their pixels, an exact detector,
the grounding loss, and a few-step training run that yields a model the engine loads.

Checks are independent of the code under test where it matters: boxes are checked against raw
pixel differences from the background, the grounding loss against a brute-force computation,
resume against an uninterrupted run, the metrics against the world's own renders (`--oracle`).
"""
from __future__ import annotations

import json
import os
import sys
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import torch

from cones2 import Cones2Error
from cones2_train.demo_world import detector
from cones2_train.demo_world.world import (BACKGROUNDS, COLOURS, INSTANCES, KINDS, Scene, WorldConfig,
                                           instance_scene, make_scene)

PATTERNED = WorldConfig(p_pattern=0.4)


# ---- the world -------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_varied():
    a, b = make_scene(3, 17, PATTERNED), make_scene(3, 17, PATTERNED)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    others = {make_scene(3, i).caption for i in range(40)}
    assert len(others) == 40
    assert make_scene(4, 17, PATTERNED) != a
    inst = [np.asarray(instance_scene("twotone_triangle", 0, i).render()) for i in range(2)]
    assert np.array_equal(inst[0], np.asarray(instance_scene("twotone_triangle", 0, 0).render()))
    assert not np.array_equal(inst[0], inst[1])


def test_scene_invariants_and_captions():
    counts = set()
    for i in range(60):
        s = make_scene(0, i, PATTERNED)
        counts.add(len(s.objects))
        assert len({o.kind for o in s.objects}) == len(s.objects)            # distinct kinds
        assert len({o.colour for o in s.objects}) == len(s.objects)          # distinct colours
        for o, named in zip(s.objects, s.named_colours):
            phrase = " ".join(w for w in ([o.pattern] if o.pattern != "plain" else []) + ([o.colour] if named else [])
                              + [o.kind])
            assert phrase in s.caption
        boxes = s.boxes
        for j, p in enumerate(boxes):                                         # pairwise gap >= 2 px
            for q in boxes[j + 1:]:
                assert p[2] + 2 <= q[0] or q[2] + 2 <= p[0] or p[3] + 2 <= q[1] or q[3] + 2 <= p[1]
    assert counts == {1, 2, 3, 4}


def test_world_v2_captions_name_both_colours():
    """World v2 names a patterned object's second colour right after its main colour; the random
    draws are those of v1 (same objects, boxes and backgrounds for the same seed and index)."""
    v2 = WorldConfig(p_pattern=0.4, name_second=True)
    seen = 0
    for i in range(80):
        a, b = make_scene(5, i, PATTERNED), make_scene(5, i, v2)
        assert a.objects == b.objects and a.background == b.background and a.named_colours == b.named_colours
        for o, named, second in zip(b.objects, b.named_colours, b.named_seconds):
            assert second == (named and o.pattern != "plain")
            if second:
                seen += 1
                assert f"a {o.pattern} {o.colour} and {o.second} {o.kind}" in b.caption
            elif o.pattern != "plain":
                assert f"a {o.pattern} {o.kind}" in b.caption
    assert seen >= 10
    assert not any(any(make_scene(5, i, PATTERNED).named_seconds) for i in range(20))     # v1 never names it


def test_caption_table_second_colour():
    from cones2_train.demo_world import models
    from cones2_train.demo_world.data import COLOUR_LIST, caption_table

    scenes = [make_scene(6, i, WorldConfig(p_pattern=0.5, name_second=True)) for i in range(30)]
    table = caption_table(models.build_tokenizer(), scenes)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            want = COLOUR_LIST.index(o.second) if s.named_seconds[j] else -1
            assert int(table.second[i, j]) == want
    assert (table.second >= 0).any()


def test_recipe_world_fingerprints():
    """The v1 world is left out of the fingerprints (old checkpoints stay valid); v2 changes the
    text and unet stages, not the VAE (which always learns on the v1 world)."""
    from cones2_train.demo_world.recipe import Recipe

    v1, v2 = Recipe(), Recipe.v2()
    assert v1.world_tag() == "" and v2.world_tag()
    assert v1.fingerprint("vae") == v2.fingerprint("vae")
    assert v1.fingerprint("text") != v2.fingerprint("text") and v1.fingerprint("unet") != v2.fingerprint("unet")
    assert v2.world() == WorldConfig(p_pattern=0.4, name_second=True)
    assert v1.demo_version == "demo-world-v1" and v2.demo_version == "demo-world-v2"


def test_ground_truth_boxes_match_rendered_pixels():
    """Pixels differ from the background only inside the boxes, and within each box the differing
    pixels reach every side (to within the 1 px an antialiased star tip may lose)."""
    for i in range(40):
        s = make_scene(1, i, PATTERNED)
        img = np.asarray(s.render()).astype(int)
        differs = np.abs(img - np.array(BACKGROUNDS[s.background])).max(-1) > 0
        inside = np.zeros_like(differs)
        for x0, y0, x1, y1 in s.boxes:
            inside[y0:y1, x0:x1] = True
            ys, xs = np.nonzero(differs[y0:y1, x0:x1])
            assert xs.min() <= 1 and ys.min() <= 1, (i, s.caption)
            assert xs.max() >= x1 - x0 - 2 and ys.max() >= y1 - y0 - 2, (i, s.caption)
        assert not (differs & ~inside).any()


# ---- the detector ------------------------------------------------------------------------------------------
def test_detector_finds_exactly_the_rendered_objects():
    cases = [make_scene(2, i, PATTERNED) for i in range(50)]
    cases += [instance_scene(n, 0, i) for n in INSTANCES for i in range(3)]
    for s in cases:
        found = detector.detect(s.render())
        got = sorted((d.colour, d.kind, d.pattern, d.second) for d in found)
        assert got == sorted((o.colour, o.kind, o.pattern, o.second) for o in s.objects), s.caption
        for o in s.objects:
            d = next(d for d in found if d.colour == o.colour)
            assert max(abs(a - b) for a, b in zip(d.centre, o.centre)) <= 1.0
            if o.pattern == "plain" and all(p.second != o.colour for p in s.objects):
                f = detector.find_colour(s.render(), o.colour)
                assert f.kind == o.kind and max(abs(a - b) for a, b in zip(f.box, o.box)) <= 1


def test_detector_every_kind_and_colour_at_the_size_extremes():
    from cones2_train.demo_world.world import Scene, Thing

    for size in (14, 26):
        for k, kind in enumerate(KINDS):
            colour = list(COLOURS)[k % len(COLOURS)]
            for bg in BACKGROUNDS:
                img = Scene((Thing(kind, colour, (10, 12, 10 + size, 12 + size)),), bg, "").render()
                (d,) = detector.detect(img)
                assert (d.kind, d.colour, d.pattern) == (kind, colour, "plain"), (size, kind, bg)


def test_detector_recognises_every_instance_exactly():
    """Every subject instance, at the instance renders' sizes (22-30 px) on every background, is
    found alone with its kind, both colours, its pattern and its centre (to 1 px)."""
    for name, inst in INSTANCES.items():
        for i in range(16):
            s = instance_scene(name, 3, i)
            (d,) = detector.detect(s.render())
            assert (d.kind, d.colour, d.pattern, d.second) == (inst.kind, inst.colour, inst.pattern, inst.second), \
                (name, i, s.background)
            assert max(abs(a - b) for a, b in zip(d.centre, s.objects[0].centre)) <= 1.0


def test_containment_matches_pixel_count():
    from cones2_train.demo_world.metrics import containment

    region = np.zeros((64, 64), bool)
    region[10:30, 20:40] = True                                           # 400 pixels
    assert containment(region, (0, 0, 1, 1)) == 1.0
    assert containment(region, (20 / 64, 10 / 64, 40 / 64, 30 / 64)) == 1.0
    assert containment(region, (30 / 64, 0, 1, 1)) == 0.5                 # columns 30..39 of 20..39
    assert containment(region, (0.9, 0.9, 1, 1)) == 0.0


def test_detector_on_empty_and_noise_images():
    from PIL import Image

    assert detector.detect(Image.new("RGB", (64, 64), BACKGROUNDS["snow"])) == []
    assert detector.find_colour(Image.new("RGB", (64, 64), BACKGROUNDS["night"]), "red") is None


def test_detector_kinds_survive_the_demo_vae_and_match_hand_labels():
    """Generated images are VAE decodings: rounded corners, bowed sides, blurred thin parts. The kind
    rule must hold there too: on the world's renders passed through the shipped VAE (ground truth
    from the generator) and on generated objects labelled by eye (bench/results/detector/). The
    nearest-prototype rule alone scored 0.79 and 0.98 on the labelled sets, and 0.88 through v2's
    VAE (v3's, shipped: 0.99; bench/detector_check.py)."""
    from PIL import Image

    from cones2_train.demo_world.metrics import eval_scene
    from diffusers import AutoencoderKL

    root = Path(__file__).resolve().parents[1]
    vae = AutoencoderKL.from_pretrained(root / "engine" / "cones2" / "data" / "demo_model" / "vae").float().eval()
    right = total = 0
    for n in (1, 2, 3, 4):
        for i in range(10):
            scene = eval_scene(9000 + i, n)
            x = torch.from_numpy(np.asarray(scene.render(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            with torch.no_grad():
                y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
            decoded = Image.fromarray(((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
            for o in scene.objects:
                found = detector.find_colour(decoded, o.colour)
                right += found is not None and found.kind == o.kind
                total += 1
    assert right / total >= 0.9, f"{right}/{total} decoded objects named right"
    labelled = root / "bench" / "results" / "detector" / "labelled_regions"
    rows = json.loads(labelled.with_suffix(".json").read_text())
    masks = np.unpackbits(np.load(labelled.with_suffix(".npz"))["masks"], axis=-1)[..., :64].astype(bool)
    for kind_set, least in (("plain", 0.95), ("composed", 0.95)):
        calls = [(detector.classify_shape(m), r["label"]) for r, m in zip(rows, masks)
                 if r["set"] == kind_set and r["label"]]
        assert len(calls) == {"plain": 123, "composed": 46}[kind_set]
        assert sum(a == b for a, b in calls) / len(calls) >= least, kind_set


# ---- grounding loss -----------------------------------------------------------------------------------------
def test_box_coverage_matches_brute_force():
    from cones2_train.demo_world.grounding import box_coverage

    boxes = torch.tensor([[[0.1, 0.2, 0.55, 0.9], [0.0, 0.0, 1.0, 0.3]]])
    got = box_coverage(boxes, 8, 8)
    fine = 800                                                          # 100 x 100 samples per cell
    c = (torch.arange(fine) + 0.5) / fine
    for j in range(2):
        x0, y0, x1, y1 = boxes[0, j].tolist()
        inside = ((c[None, :] >= x0) & (c[None, :] < x1) & (c[:, None] >= y0) & (c[:, None] < y1)).float()
        ref = inside.reshape(8, 100, 8, 100).mean(dim=(1, 3)).flatten()
        assert torch.allclose(got[0, j], ref, atol=1e-2)


def test_grounding_loss_against_direct_computation():
    from cones2_train.demo_world.grounding import grounding_loss

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 16, 77), -1)
    positions = torch.tensor([[3, 7], [5, 0]])
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], [[0.25, 0.0, 1.0, 0.75], [0, 0, 1, 1]]])
    valid = torch.tensor([[True, True], [True, False]])
    token, pixel = grounding_loss([probs], positions, boxes, valid)
    token_terms, pixel_terms = [], []
    for b, j in ((0, 0), (0, 1), (1, 0)):
        a = probs[b, :, positions[b, j]].reshape(4, 4)
        x0, y0, x1, y1 = (int(v * 4) for v in boxes[b, j].tolist())            # boxes on whole cells
        token_terms.append((1 - a[y0:y1, x0:x1].sum() / a.sum()) ** 2)
        pixel_terms.append(((1 - a[y0:y1, x0:x1]) ** 2).mean())
    assert torch.allclose(token, torch.stack(token_terms).mean(), atol=1e-6)
    assert torch.allclose(pixel, torch.stack(pixel_terms).mean(), atol=1e-6)
    # all of the word's attention inside its box, all of the box's attention on the word: both zero
    ideal = torch.zeros(1, 16, 77)
    ideal[0, :, 0] = 1.0
    ideal[0, [0, 1, 4, 5], 0] = 0.0
    ideal[0, [0, 1, 4, 5], 3] = 1.0
    token, pixel = grounding_loss([ideal], torch.tensor([[3]]), boxes[:1, :1], torch.tensor([[True]]))
    assert float(token) < 1e-9 and float(pixel) < 1e-9


# ---- training -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from cones2_train.demo_world.recipe import Recipe
    from cones2_train.demo_world.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo-smoke")
    summary = train(out, Recipe.smoke(), progress=False)
    return out, summary


def test_smoke_training_writes_a_model_the_engine_loads(smoke_run):
    import cones2

    out, summary = smoke_run
    model = summary["model"]
    index = json.loads((model / "model_index.json").read_text())
    assert index["_cones2_demo"]
    from safetensors.torch import load_file

    for part in ("unet", "vae", "text_encoder"):
        (f,) = list((model / part).glob("*.safetensors"))
        assert {t.dtype for t in load_file(f).values()} == {torch.float16}
    engine = cones2.Engine.from_pretrained(model)
    assert engine.default_resolution == 64 and engine.level_shapes(64, 64) == [(8, 8), (4, 4), (2, 2)]
    assert engine.prediction_type == "v_prediction"
    assert engine.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    layout = cones2.Layout.from_boxes({"star": (0, 0, 0.5, 0.5), "ring": (0.5, 0.5, 1, 1)})
    g = engine.generate("a red star and a blue ring on a sand background", layout=layout, steps=3, progress=False)
    assert g.image.size == (64, 64) and torch.isfinite(g.latents).all()


def test_a_16x16_latent_recipe_trains_grounds_and_samples(tmp_path):
    """`--latent 16` (3 VAE blocks): the engine sees 16x16 latents and levels 16/8/4, the grounding
    losses are recorded on the two cross-attention levels of that grid, and a snapshot reads the run."""
    import cones2
    from cones2_train.demo_world.train import main

    torch.set_num_threads(1)
    assert main(["--out", str(tmp_path), "--smoke", "--latent", "16", "--no-progress"]) == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    unet = [e for e in log if e.get("stage") == "unet"]
    assert unet and all(e["token"] > 0 and e["pixel"] > 0 for e in unet)
    recipe = json.loads((tmp_path / "model" / "recipe.json").read_text())["recipe"]
    assert len(recipe["vae_channels"]) == 3
    engine = cones2.Engine.from_pretrained(tmp_path / "model", backend="sdpa")
    assert engine.vae_scale == 4 and engine.level_shapes(64, 64) == [(16, 16), (8, 8), (4, 4)]
    layout = cones2.Layout.from_boxes({"star": (0, 0, 0.5, 0.5)})
    g = engine.generate("a red star on a sand background", layout=layout, steps=2, progress=False)
    assert tuple(g.latents.shape) == (1, 4, 16, 16) and g.image.size == (64, 64)
    from cones2_train.demo_world.snapshot import main as snapshot   # reads the run under the same recipe

    assert snapshot(["--out", str(tmp_path), "--smoke", "--latent", "16", "--model-dir", str(tmp_path / "snap")]) == 0
    assert cones2.Engine.from_pretrained(tmp_path / "snap", backend="sdpa").vae_scale == 4


@pytest.mark.parametrize("latent", [8, 16])
def test_full_recipe_fits_the_size_budget(latent):
    """Issue 14: the shipped weights stay under ~40 MB; either latent grid's full recipe is far below."""
    from cones2_train.demo_world import models
    from cones2_train.demo_world.recipe import recipe_for

    r = recipe_for("v2", latent)
    tok = models.build_tokenizer()
    params = sum(p.numel() for m in (models.build_vae(r), models.build_text_encoder(r, tok), models.build_unet(r))
                 for p in m.parameters())
    assert 2 * params <= 25 * 10**6                                  # fp16 bytes


def test_resume_continues_exactly(smoke_run, tmp_path):
    """Stopped inside the unet stage (after vae and text finished), then resumed: every stage's
    artefact equals the uninterrupted run's. Not bit for bit: oneDNN's CPU kernels round differently
    depending on what ran before in the process (two identical fresh runs do agree bit for bit), which
    moves weights by ~2e-5; skipping the optimizer restore moves them by ~7e-4, a wrong batch more."""
    from safetensors.torch import load_file

    from cones2_train.demo_world.loop import StageInterrupted
    from cones2_train.demo_world.recipe import Recipe
    from cones2_train.demo_world.train import train

    recipe = Recipe.smoke()
    stop_after = recipe.vae_steps + recipe.text_steps + 2
    calls = []
    with pytest.raises(StageInterrupted) as info:
        train(tmp_path, recipe, progress=False, should_stop=lambda: calls.append(1) or len(calls) == stop_after)
    assert (info.value.stage, info.value.step) == ("unet", 2)
    with pytest.raises(Cones2Error, match="--resume"):
        train(tmp_path, recipe, progress=False)
    with pytest.raises(Cones2Error, match="other recipe settings"):
        train(tmp_path, Recipe.smoke(unet_lr=1e-3), progress=False, resume=True)
    train(tmp_path, recipe, resume=True, progress=False)
    for stage in ("vae", "text", "unet"):
        a, b = (load_file(p / "stages" / f"{stage}.safetensors") for p in (smoke_run[0], tmp_path))
        assert a.keys() == b.keys(), stage
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-5, stage


def test_learning_rate_warms_up_holds_then_cools_down():
    """Warm-up over 2 steps, constant, then a 4-step linear decay ending at peak / 4 (written out by hand)."""
    from cones2_train.demo_world.stages import lr_at

    got = [lr_at(i, 1.0, 2, steps=10, cooldown=4) for i in range(10)]
    assert got == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert [lr_at(i, 1.0, 2) for i in range(10)] == pytest.approx([0.5] + [1] * 9)


def test_cooldown_extends_a_finished_constant_run(smoke_run, tmp_path):
    """A finished constant-rate run is extended with a decay (`--steps unet=6 --cooldown 3 --resume`): the
    optimizer ends at a third of the peak rate, the artefact records the cooldown, and a checkpoint inside the
    decay refuses a recipe that decays differently or not at all."""
    import shutil

    from cones2_train.demo_world.train import main

    shutil.copytree(smoke_run[0], tmp_path, dirs_exist_ok=True)
    common = ["--out", str(tmp_path), "--smoke", "--no-progress", "--resume"]
    assert main([*common, "--steps", "unet=6", "--cooldown", "3"]) == 0
    state = json.loads((tmp_path / "checkpoints" / "unet" / "state.json").read_text())
    lrs = [(g["lr"], g["peak"]) for g in state["optimizer"]["param_groups"]]
    assert state["step"] == 6 and all(lr == pytest.approx(peak / 3) for lr, peak in lrs)
    assert state["info"]["decay_start"] == 3
    from cones2_train.demo_world.stages import read_meta

    assert read_meta(tmp_path / "stages" / "unet.safetensors")["cooldown"] == 3
    for other in (["--steps", "unet=8"], ["--steps", "unet=8", "--cooldown", "4"]):
        assert main([*common, *other]) == 2                     # the decay began at step 3 of 6
    assert main([*common, "--steps", "unet=6", "--cooldown", "7"]) == 2     # longer than the stage


def test_cli_user_errors(tmp_path, capsys):
    from cones2_train.demo_world.train import main

    assert main(["--out", str(tmp_path), "--smoke", "--steps", "5"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--smoke", "--stage", "unet"]) == 2       # vae has not run
    assert "--stage vae" in capsys.readouterr().err


# ---- metrics and the benchmark -----------------------------------------------------------------------------------
def _quality(**settings) -> dict:
    """The demo-world evaluation, called as the library it is (`bench/quality.py` is its command line)."""
    from cones2_train.demo_world.evaluation import Settings, evaluate

    return evaluate(Settings(progress=False, **settings).quick())


def test_quality_metrics_score_the_world_itself_perfectly(tmp_path):
    res = _quality(oracle=True)
    for row in res["layout"].values():
        assert row["guided"]["fidelity"] == 1.0 and row["guided"]["layout"] == 1.0
        assert row["guided"]["containment"] == 1.0
        assert row["unguided"]["fidelity"] == 1.0 and row["unguided"]["layout"] < 0.8
        assert row["unguided"]["containment"] < 0.8
    for name in INSTANCES:
        assert res["residuals"][name]["with"]["exact"] == 1.0 and res["residuals"][name]["without"]["exact"] == 0.0
    assert res["residuals"]["composition"]
    for pair in res["residuals"]["composition"].values():
        assert pair["with"]["both"] == 1.0 and pair["without"]["both"] == 0.0
    demo = res["residuals"]["demo"]                   # two residual instances + a plain subject, in boxes
    assert demo["with"]["all"] == 1.0 and demo["with"]["layout"] == 1.0 and demo["with"]["containment"] == 1.0
    assert demo["without"]["both"] == 0.0 and demo["without"]["plain_fidelity"] == 1.0


def test_residual_generations_start_at_the_first_residual_prompt(tmp_path):
    """`first_residual_prompt` moves every residual figure (alone, composed, make demo) to later seeds,
    so a setting chosen on seeds 0..N-1 can be judged on seeds it was not chosen on."""
    from cones2_train.demo_world.evaluation import OracleImages, Settings, evaluate_residuals

    class Recording(OracleImages):
        def __init__(self):
            self.seeds: list[int] = []

        def prompts(self, jobs):
            self.seeds += [seed for *_, seed in jobs]
            return super().prompts(jobs)

    source = Recording()
    settings = Settings(oracle=True, residual_prompts=3, first_residual_prompt=200, progress=False)
    res = evaluate_residuals(source, None, settings, tmp_path)
    batches = len(INSTANCES) * 2 + len(res["composition"]) * 2 + 2      # without / with, each figure
    assert source.seeds == [200, 201, 202] * batches
    with pytest.raises(ValueError, match="first_residual_prompt"):
        Settings(first_residual_prompt=-1)


def test_quality_quick_runs_on_a_smoke_model(smoke_run, tmp_path):
    model = smoke_run[1]["model"]
    misses = tmp_path / "misses"
    res = _quality(model=str(model), negative_weight=-20, first_prompt=5, save_misses=str(misses))
    assert set(res["layout"]) == {"2", "3"}
    assert res["settings"]["negative_weight"] == -20 and res["settings"]["first_prompt"] == 5
    sheets = sorted(misses.glob("*.png")) if misses.exists() else []
    assert len(sheets) == sum(row["saved_misses"] for row in res["layout"].values())
    for n, row in res["layout"].items():
        for key in ("guided", "unguided"):
            assert row[key]["objects"] == 3 * int(n)
            assert all(0.0 <= row[key][m] <= 1.0 for m in ("present", "fidelity", "layout", "containment"))
        change = row["fidelity_change"]           # every prompt has n objects: the paired mean is the plain gap
        assert change["mean"] == pytest.approx(row["guided"]["fidelity"] - row["unguided"]["fidelity"], abs=1e-9)
        assert change["ci95"][0] <= change["mean"] <= change["ci95"][1]
    assert set(res["residuals"]) == set(INSTANCES) | {"composition", "demo"}


def test_lost_with_guidance_names_exactly_the_objects_guidance_lost():
    """What `--save-misses` writes a sheet for, on known images: the world's render (every object
    found) against the bare background (every object lost) or the render again (nothing lost)."""
    from PIL import Image

    from cones2_train.demo_world.metrics import eval_scene, layout_boxes, lost_with_guidance, score_scene

    scene = eval_scene(10, 2)
    boxes = layout_boxes(scene)
    render = scene.render()
    blank = Image.new("RGB", render.size, (128, 128, 128))
    found, none = score_scene(render, scene, boxes), score_scene(blank, scene, boxes)
    assert lost_with_guidance(scene, found, none) == [o.kind for o in scene.objects]
    assert lost_with_guidance(scene, found, found) == []
    assert lost_with_guidance(scene, none, none) == []                 # missing either way: not guidance's loss
    assert lost_with_guidance(scene, none, found) == []


def test_object_area_and_offset_from_its_box_on_known_renders():
    """On the world's render: each object's found area is its drawn pixels, its offset is ~0 from its
    own (grown) box, and ~2 half sides from a box of its size moved one width to the right."""
    from cones2_train.demo_world.metrics import eval_scene, layout_boxes, score_scene

    scene = eval_scene(3, 2)
    render = scene.render()
    for s in score_scene(render, scene, layout_boxes(scene)):
        assert s.kind_ok and s.offset < 0.15
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        width = x1 - x0
        moved = {o.kind: ((x0 + width) / 64, y0 / 64, (x1 + width) / 64, y1 / 64)}
        single = Scene((o,), scene.background, "")
        [s] = score_scene(single.render(), single, moved)
        assert s.offset == pytest.approx(2.0, abs=1.5 / width) and not s.in_box
        half_covered = int((single.coverage()[0] >= 0.5).sum())       # the detector's foreground rule
        assert abs(s.area - half_covered) <= 0.05 * half_covered


def test_guidance_loss_geometry_by_hand():
    """Three objects found unguided (one lost with guidance, drawn at a quarter of its area), one never
    found: medians and per-offset shares written out by hand."""
    from cones2_train.demo_world.metrics import ObjectScore, guidance_loss_geometry

    def score(ok, area, offset):
        return ObjectScore("red", "star", area is not None, ok, offset is not None and offset <= 1, None, None,
                           area, offset)

    unguided = [score(True, 100, 0.5), score(True, 200, 1.5), score(True, 100, 2.5), score(False, None, None)]
    guided = [score(True, 90, 0.2), score(False, 50, 0.9), score(True, 70, 0.4), score(True, 80, 0.1)]
    g = guidance_loss_geometry(unguided, guided)
    assert g["lost"] == {"objects": 1, "area_ratio_median": 0.25, "unguided_offset_median": 1.5}
    assert g["kept"] == {"objects": 2, "area_ratio_median": pytest.approx(0.8), "unguided_offset_median": 1.5}
    assert g["lost_by_unguided_offset"] == {"0-1": {"objects": 1, "lost": 0.0}, "1-2": {"objects": 1, "lost": 1.0},
                                            "2-3": {"objects": 1, "lost": 0.0}, "3-inf": {"objects": 0, "lost": None}}


def test_instance_folder_and_templates(tmp_path):
    from cones2_train.demo_world.instances import write_instance_folder
    from cones2_train.templates import load_templates

    folder = write_instance_folder("twotone_triangle", tmp_path / "triangle")
    assert len(list(folder.glob("*.png"))) == 5
    templates = load_templates(str(folder / "templates.txt"))
    assert len(templates) == 64 and all("triangle" not in t for t in templates)


# ---- the trained model (once it exists) -------------------------------------------------------------------
def _shipped_demo_model() -> str | None:
    from cones2.default_model import shipped_demo_model

    path = shipped_demo_model()
    return str(path) if path else None


TRAINED = os.environ.get("CONES2_DEMO_MODEL") or _shipped_demo_model()


# `make demo`'s request (Makefile): its prompt, residuals, boxes, 30 steps with 15 guided
DEMO_PROMPT = "a heart, a triangle and a blue star on a sand background"
DEMO_BOXES = {"heart": (0.05, 0.05, 0.45, 0.45), "star": (0.55, 0.05, 0.95, 0.45), "triangle": (0.3, 0.55, 0.7, 0.95)}
DEMO_SEEDS = (0, 1, 2)     # make demo's seed 0 and two more


@pytest.fixture(scope="module")
def demo_engine():
    """The engine `make demo` gets: the CPU default backend, not the suite's sdpa pin (conftest)."""
    import cones2

    pinned = os.environ.pop("CONES2_BACKEND", None)
    try:
        engine = cones2.Engine.from_pretrained(TRAINED)
    finally:
        if pinned is not None:
            os.environ["CONES2_BACKEND"] = pinned
    return engine


def _centre_in_box(detection, box, size) -> bool:
    (cx, cy), (w, h) = detection.centre, size
    x0, y0, x1, y1 = box
    return x0 * w <= cx <= x1 * w and y0 * h <= cy <= y1 * h


@pytest.mark.skipif(not TRAINED, reason="no shipped demo model in this build; set CONES2_DEMO_MODEL to a trained one")
def test_trained_model_puts_each_colour_in_its_box(demo_engine):
    """Layout-guided generations on a fixed seed set show each subject's colour inside its box.
    The few-step smoke model scores 0.125 here; the shipped demo model scores 0.98-0.99 on the
    full evaluation (bench/results/quality.md)."""
    import cones2
    from cones2_train.demo_world.metrics import eval_scene, layout_boxes, score_scene, summarize

    torch.set_num_threads(1)
    engine = demo_engine
    scenes = [eval_scene(i, 2) for i in range(8)]
    reqs = [engine.request(s.caption, None, cones2.Layout.from_boxes(layout_boxes(s)), seed=i, steps=20)
            for i, s in enumerate(scenes)]
    images = [g.image for g in engine.generate_batch(reqs, progress=False)]
    scores = [x for s, im in zip(scenes, images) for x in score_scene(im, s, layout_boxes(s))]
    assert summarize(scores)["layout"] >= 0.75


@pytest.mark.skipif(not TRAINED, reason="no shipped demo model in this build; set CONES2_DEMO_MODEL to a trained one")
@pytest.mark.parametrize("seed", DEMO_SEEDS)
def test_make_demo_puts_every_subject_in_its_box(demo_engine, seed):
    """README's claim about `make demo`, through the backend `make demo` runs (the CPU default), on
    several seeds: the heart and the triangle come out as the residuals' exact instances (kind,
    pattern and both colours, found by the world's pixel detector) with their centres in their boxes,
    and the blue star in its box; without the residuals neither instance appears."""
    import cones2
    from cones2.backends import select_backend
    from cones2_train.demo_world.metrics import score_instance

    torch.set_num_threads(1)
    with unittest.mock.patch.dict(os.environ):
        os.environ.pop("CONES2_BACKEND", None)
        assert demo_engine.default_backend == select_backend("cpu")[0]   # make demo's backend, not the pin
    folder = os.path.join(TRAINED, "residuals")
    residuals = {"heart": cones2.Residual.load(os.path.join(folder, "twotone_heart.safetensors")),
                 "triangle": cones2.Residual.load(os.path.join(folder, "twotone_triangle.safetensors"))}
    kw = dict(seed=seed, steps=30, guidance_steps=15, progress=False)
    with_them = demo_engine.generate(DEMO_PROMPT, residuals, cones2.Layout.from_boxes(DEMO_BOXES), **kw)
    assert with_them.backend == demo_engine.default_backend
    image = with_them.image
    found = detector.detect(image)
    for subject, name in (("heart", "twotone_heart"), ("triangle", "twotone_triangle")):
        inst = INSTANCES[name]
        exact = [d for d in found if d.kind == inst.kind and d.pattern == inst.pattern
                 and {d.colour, d.second} == {inst.colour, inst.second}]
        assert exact, f"seed {seed}: no {name} in the image; found {found}"
        assert any(_centre_in_box(d, DEMO_BOXES[subject], image.size) for d in exact), \
            f"seed {seed}: {name} at {[d.box for d in exact]}, not in its box {DEMO_BOXES[subject]}"
    stars = [d for d in found if d.kind == "star" and d.colour == "blue"]
    assert any(_centre_in_box(d, DEMO_BOXES["star"], image.size) for d in stars), f"seed {seed}: stars {stars}"
    without = demo_engine.generate(DEMO_PROMPT, None, cones2.Layout.from_boxes(DEMO_BOXES), **kw).image
    for name in ("twotone_heart", "twotone_triangle"):
        assert not score_instance(without, INSTANCES[name]).exact, f"seed {seed}: {name} without its residual"
