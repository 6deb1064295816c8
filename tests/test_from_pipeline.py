"""Embedding next to diffusers: an Engine built on a loaded StableDiffusionPipeline shares its
modules, and the pipeline keeps working (same output as before the engine existed)."""
from __future__ import annotations

import pytest
import torch

import cones2


@pytest.fixture()
def pipe(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def _pipe_latents(pipe) -> torch.Tensor:
    out = pipe("a dog and a mug", num_inference_steps=2, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images


def test_engine_from_pipeline_shares_weights_and_leaves_the_pipeline_usable(pipe, tiny_engine):
    pipe.set_progress_bar_config(disable=True)
    before = _pipe_latents(pipe)
    engine = cones2.Engine.from_pipeline(pipe)
    assert engine.unet is pipe.unet and engine.vae is pipe.vae and engine.text_encoder is pipe.text_encoder
    torch.testing.assert_close(_pipe_latents(pipe), before, rtol=0, atol=1e-5)

    layout = cones2.Layout.from_boxes({"dog": (0, 0, 0.5, 1), "mug": (0.5, 0, 1, 1)})
    got = engine.generate("a dog and a mug", None, layout, steps=2, height=64, width=64, progress=False)
    want = tiny_engine.generate("a dog and a mug", None, layout, steps=2, height=64, width=64, progress=False)
    # Same weights and processors; the two loads' UNets still differ in float32 summation order by up
    # to ~1e-6 per forward (diffusers 0.42 / transformers 5.25), which CFG x 7.5 over two steps grows
    # to ~1e-5. A wrong module or schedule moves the latents by orders of magnitude more.
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-4)


def test_from_pipeline_names_what_is_missing(pipe):
    pipe.vae = None
    with pytest.raises(cones2.Cones2Error, match="pipeline: the pipeline has no vae"):
        cones2.Engine.from_pipeline(pipe)
