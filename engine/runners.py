"""UNet runners: what the sampler calls once per step, one flat `backend` name for users.

A runner is `runner(sample, timestep, embeddings, rectification) -> prediction`:
  sample (B, 4, h, w) in the model dtype, timestep a 0-dim float32 tensor, embeddings (B, 77, D),
  rectification a `Rectification` or None (unguided step).
PyTorch runners pair the diffusers UNet with an attention backend (`reference`, `sdpa`,
`triton`); compiled runners (`onnxruntime`, `tensorrt`) live in `cones2.export` and are imported
only when asked for.
"""
from __future__ import annotations

import importlib

import torch

from .attention import AttentionContext, Rectification, attention_backend_names, get_backend
from .errors import Cones2Error

# Runners that are not PyTorch UNets: name -> "module:factory", factory(engine, **options).
_COMPILED = {
    "onnxruntime": "cones2.export.ort_backend:OrtUNetRunner",
    "tensorrt": "cones2.export.trt_backend:TrtUNetRunner",
}


def backend_names() -> list[str]:
    """Every name `--backend` accepts."""
    return attention_backend_names() + sorted(_COMPILED)


class TorchUNetRunner:
    """The diffusers UNet with every attention layer routed to one attention backend."""

    def __init__(self, unet, attention_backend: str):
        self.unet = unet
        self.backend = get_backend(attention_backend)
        self.name = attention_backend

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> torch.Tensor:
        context = AttentionContext(self.backend, rectification)
        return self.unet(sample, timestep, encoder_hidden_states=embeddings,
                         cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


def make_runner(name: str, engine, **options):
    """Build the runner called `name` for `engine` (options go to compiled runners, e.g. onnx_dir)."""
    if name in attention_backend_names():
        return TorchUNetRunner(engine.unet, name)
    if name in _COMPILED:
        module, attr = _COMPILED[name].split(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise Cones2Error(f"backend {name!r} is not available here: {exc}", "backend") from None
        return factory(engine, **options)
    raise Cones2Error(f"unknown backend {name!r}; choose from {', '.join(backend_names())}", "backend")
