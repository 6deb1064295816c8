"""Issue 26, item 2: single-file checkpoints (original key layout) load through diffusers' single-file
conversion, offline; the demo model written as one file gives the folder model's latents."""
from __future__ import annotations

import datetime

import pytest
import torch
from safetensors.torch import save_file

import cones2
from cones2.default_model import shipped_demo_model
from cones2.single_file import config_dir
from single_file_support import to_original_layout

DEMO = shipped_demo_model()
pytestmark = pytest.mark.skipif(DEMO is None, reason="this build carries no demo model")


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    state = to_original_layout(DEMO)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "demo.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, folder / "demo.ckpt")
    return folder


def _latents(engine):
    layout = cones2.Layout.from_boxes({"heart": (0.05, 0.05, 0.45, 0.45)})
    return engine.generate("a heart on a sand background", None, layout, seed=0, steps=2, guidance_steps=1,
                           progress=False).latents


@pytest.mark.parametrize("name", ["demo.safetensors", "demo.ckpt"])
def test_demo_model_round_trips_through_a_single_file(demo_file, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = cones2.Engine.from_pretrained(DEMO, backend="sdpa")
    single = cones2.Engine.from_pretrained(demo_file / name, backend="sdpa", model_config=DEMO)
    assert single.fingerprint == folder.fingerprint
    assert torch.equal(_latents(single), _latents(folder))


def test_a_ckpt_that_needs_code_is_refused(tmp_path):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "when": datetime.datetime(2020, 1, 1)}, bad)
    with pytest.raises(cones2.Cones2Error, match=r"^model: cannot read bad.ckpt as a checkpoint .*weights_only=True"):
        cones2.Engine.from_pretrained(bad, backend="sdpa")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, other)
    with pytest.raises(cones2.Cones2Error, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        cones2.Engine.from_pretrained(other, backend="sdpa")


@pytest.mark.parametrize("family,unet,text", [("sd1", 859_520_964, 123_060_480), ("sd2", 865_910_724, 340_387_840)])
def test_shipped_configs_are_the_sd_architectures(family, unet, text):
    """The shipped configs build SD 1.x / 2.x exactly (parameter counts of the published models; on
    the meta device, so nothing is allocated). The VAE is the same in both: 83,653,863."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = config_dir(family)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))) == unet
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))) == text
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
