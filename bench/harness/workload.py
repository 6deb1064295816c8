"""The benchmark workload: a prompt with K subject words, a random residual each, boxes side by
side; and the reference implementation's way of calling the UNet (`paper-style`), registered as a
UNet runner through the engine's public backend registry."""
from __future__ import annotations

import torch

from cones2 import Cones2Error, Layout, Residual
from cones2.attention import Rectification
from cones2.backends import RUNNER, BackendSpec, register
from cones2.runners import TorchUNetRunner

WORDS = ("dog", "mug", "cat", "vase", "hat", "book", "lamp", "ball")
PAPER_STYLE = "paper-style"


class UnbatchedCfgRunner:
    """The reference implementation's UNet use: the conditional and unconditional branches as two
    separate calls (batch R each) instead of one call of batch 2R. Same results (per-sample std)."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, sample, timestep, embeddings, rectification):
        R = sample.shape[0] // 2
        cond_rect = None
        if rectification is not None:
            cond_rect = Rectification({n: w[:R] for n, w in rectification.weights.items()}, rectification.coef[:R])
        e_cond = self.runner(sample[:R], timestep, embeddings[:R], cond_rect)
        e_uncond = self.runner(sample[R:], timestep, embeddings[R:], None)
        return torch.cat([e_cond, e_uncond])


register(BackendSpec(PAPER_STYLE, RUNNER, lambda engine: UnbatchedCfgRunner(TorchUNetRunner(engine.unet, "reference")),
                     "benchmark yardstick: materialised fp32 attention, CFG branches as separate UNet calls"))


class Workload:
    """Prompt with K subject words, a random residual for each, boxes side by side."""

    def __init__(self, engine, subjects: int, resolution: int, steps: int, guidance_steps: int | None,
                 mode: str = "paper-exact"):
        if not 1 <= subjects <= len(WORDS):
            raise Cones2Error(f"must be in [1, {len(WORDS)}], got {subjects}", "subjects")
        words = WORDS[:subjects]
        self.prompt = "a photo of " + " and ".join(f"a {w}" for w in words)
        g = torch.Generator().manual_seed(0)
        rows = {w: len(engine.tokenizer(w, add_special_tokens=False).input_ids) for w in words}
        self.residuals = {w: Residual(0.05 * torch.randn(rows[w], engine.text_dim, generator=g), word=w)
                          for w in words}
        self.layout = Layout.from_boxes({w: (j / subjects + 0.02, 0.3, (j + 1) / subjects - 0.02, 0.95)
                                         for j, w in enumerate(words)})
        self.settings = dict(steps=steps, guidance_steps=guidance_steps, height=resolution, width=resolution, seed=0,
                             mode=mode)

    def request(self, engine, guided: bool = True):
        return engine.request(self.prompt, self.residuals, self.layout if guided else None, **self.settings)


def unet_calls(steps: int, guidance_steps: int) -> int:
    """UNet calls (of batch 2: both CFG branches) in one sampling run: self-recurrence doubles G steps."""
    return steps + guidance_steps
