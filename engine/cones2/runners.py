"""UNet runners: what the sampler calls once per step.

A runner is `runner(sample, timestep, embeddings, rectification) -> prediction`:
  sample (B, 4, h, w) in the model dtype, timestep a 0-dim float32 tensor, embeddings (B, 77, D),
  rectification a `Rectification` or None (unguided step).
An attention backend (`reference`, `sdpa`, `triton`) runs inside `TorchUNetRunner`, the diffusers
UNet; a registered UNet runner (`onnxruntime`, `tensorrt`) replaces it. `cones2.backends` knows
which name is which.
"""
from __future__ import annotations

import torch

from .attention import AttentionContext, Rectification
from .backends import ATTENTION, BASE_ATTENTION, attention_backend, backend_names, get_spec
from .errors import Cones2Error


class TorchUNetRunner:
    """The diffusers UNet with every attention layer routed to one attention backend."""

    def __init__(self, unet, attention_backend_name: str):
        self.unet = unet
        self.backend = attention_backend(attention_backend_name)
        self.name = attention_backend_name

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> torch.Tensor:
        context = AttentionContext(self.backend, rectification)
        return self.unet(sample, timestep, encoder_hidden_states=embeddings,
                         cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


def eager_runner_for(runner, unet) -> TorchUNetRunner:
    """The eager PyTorch UNet with `runner`'s attention math, for the passes of `fast` mode that reuse
    work (they call the UNet's blocks one by one): `runner` itself when it is one; for a compiled UNet,
    its module and attention backend; for a UNet runner (ONNX Runtime, TensorRT), `unet` with the
    exact base backend (`sdpa`), whose math the exported graphs reproduce."""
    if isinstance(runner, TorchUNetRunner):
        return runner
    name = getattr(runner, "name", None)
    if name in backend_names() and get_spec(name).kind == ATTENTION:
        return TorchUNetRunner(getattr(runner, "unet", unet), name)
    return TorchUNetRunner(unet, BASE_ATTENTION)


def make_runner(name: str, engine, *, compile: bool = False, **options):
    """Build the runner for backend `name` on `engine` (options go to UNet runners, e.g. onnx_dir).
    compile: run the PyTorch UNet through torch.compile (`cones2.compiled`). It applies to attention
    backends; UNet runners run their own graphs and ignore it (the CLI refuses the combination)."""
    spec = get_spec(name)
    if spec.kind == ATTENTION:
        if options:
            raise Cones2Error(f"attention backend {name!r} takes no options, got {', '.join(sorted(options))}",
                              "backend_options")
        if compile:
            from .compiled import CompiledUNetRunner
            from .reuse import install_cross_attention_cache

            # fast mode's eager passes wrap the cross-attention processors: wrap them before tracing
            # (transparent without a cache), so they never change the modules the graphs guard on
            install_cross_attention_cache(engine.unet)
            return CompiledUNetRunner(engine.unet, name, engine.device)
        return TorchUNetRunner(engine.unet, name)
    unknown = sorted(set(options) - {o.name for o in spec.options})
    if unknown:
        raise Cones2Error(f"backend {name!r} takes no option {', '.join(unknown)}; it takes "
                          f"{', '.join(o.name for o in spec.options) or 'none'}", "backend_options")
    missing = [k for k in spec.needs if options.get(k) is None]
    if missing:
        raise Cones2Error(f"backend {name!r} needs {', '.join(missing)}", "backend_options")
    return spec.factory(engine, **options)
