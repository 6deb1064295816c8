"""The opt-in compiled UNet runner: `torch.compile` of the diffusers UNet call (inductor), with CUDA
graphs on CUDA (mode "reduce-overhead"). `Engine.from_pretrained(..., compile=True)` uses it.

Everything that changes between requests or steps is a tensor input of the compiled call: latents,
timestep, the (B, 77, D) embeddings, the layout weight maps (one (B, N, 77) per attention
resolution) and the (B,) rectification coefficients g * log(1 + sigma_i^2). A new prompt, residual,
layout, guidance weight or step therefore never recompiles; a new (batch, resolution) does: shapes
are static (one graph per shape, which is what CUDA graphs capture). Guided and unguided calls are
two compiled functions, so two graphs per shape. The math is the attention backend's, unchanged:
backends whose spec says `traceable` (reference, sdpa) are traced (inductor fuses the rectification
bias); any other (triton, plugins) runs as one opaque custom op per attention call, so the graph
never breaks around it.
"""
from __future__ import annotations

import torch

from .attention import AttentionContext, Rectification
from .backends import attention_backend, get_spec

# Graphs one compiled function may hold: (batch sizes x resolutions) a service warms up, per engine.
GRAPHS_PER_FUNCTION = 256
# The torch.compile backend. Tests that only count graphs use "aot_eager" (same tracing and guards,
# no code generation) to stay short; see tests/test_compiled_runner.py.
COMPILER = "inductor"


@torch.library.custom_op("cones2::plain_attention", mutates_args=())
def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """`attention_backend(backend).plain`, returned laid out (B, N, H, d) in memory (see `_cross_attention`)."""
    return _bnhd(attention_backend(backend).plain(q, k, v, scale))


@torch.library.custom_op("cones2::cross_attention", mutates_args=())
def _cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, coef: torch.Tensor,
                     scale: float, backend: str) -> torch.Tensor:
    """`attention_backend(backend).cross`, returned laid out (B, N, H, d) in memory: one layout whatever
    the backend returns (free for the Triton kernel, whose output already is), so the compiled graph
    knows the strides, and merging heads afterwards is free."""
    return _bnhd(attention_backend(backend).cross(q, k, v, weight, coef, scale))


def _bnhd(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@_plain_attention.register_fake
def _(q, k, v, scale, backend):
    B, H, N, _ = q.shape
    return q.new_empty((B, N, H, v.shape[-1])).transpose(1, 2)


@_cross_attention.register_fake
def _(q, k, v, weight, coef, scale, backend):
    B, H, N, _ = q.shape
    return q.new_empty((B, N, H, v.shape[-1])).transpose(1, 2)


class OpaqueBackend:
    """An attention backend seen by dynamo as two custom ops (it never traces into the backend)."""

    def __init__(self, name: str):
        self.name = name

    def plain(self, q, k, v, scale):
        return _plain_attention(q, k, v, float(scale), self.name)

    def cross(self, q, k, v, weight, coef, scale):
        return _cross_attention(q, k, v, weight, coef, float(scale), self.name)


def _allow_graphs_per_shape() -> None:
    """One graph per (batch, resolution, guided?) must never hit dynamo's recompile limit (8 by
    default), past which it silently falls back to eager."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, GRAPHS_PER_FUNCTION)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * GRAPHS_PER_FUNCTION)


class CompiledUNetRunner:
    """The diffusers UNet with one attention backend, called through `torch.compile`.

    Same contract as `TorchUNetRunner`: `runner(sample (B, 4, h, w), timestep 0-dim float32,
    embeddings (B, 77, D), rectification or None) -> prediction (B, 4, h, w)`.
    mode: torch.compile mode (default "reduce-overhead" on CUDA = inductor + CUDA graphs, "default"
    elsewhere). channels_last: convert the UNet's weights to channels_last (default: on CUDA; the
    module is shared with the engine's eager runners, which compute the same math in that layout).
    compiler: the torch.compile backend (default `COMPILER`, inductor; `mode` applies to inductor only).
    """

    def __init__(self, unet, attention_backend_name: str, device: torch.device | str, *, mode: str | None = None,
                 channels_last: bool | None = None, compiler: str | None = None):
        self.unet = unet
        self.name = attention_backend_name
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.backend = (attention_backend(attention_backend_name) if get_spec(attention_backend_name).traceable
                        else OpaqueBackend(attention_backend_name))
        self.compiler = compiler or COMPILER
        inductor = self.compiler == "inductor"
        self.mode = (mode or ("reduce-overhead" if cuda else "default")) if inductor else None
        self.cudagraphs = cuda and self.mode in ("reduce-overhead", "max-autotune")
        self.channels_last = cuda if channels_last is None else channels_last
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        _allow_graphs_per_shape()
        compile_ = dict(backend=self.compiler, mode=self.mode, dynamic=False, fullgraph=True)
        self._plain = torch.compile(self._plain_call, **compile_)
        self._guided = torch.compile(self._guided_call, **compile_)

    def _plain_call(self, sample, timestep, embeddings):
        context = AttentionContext(self.backend, None)
        return self.unet(sample, timestep, encoder_hidden_states=embeddings,
                         cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]

    def _guided_call(self, sample, timestep, embeddings, weights, coef):
        context = AttentionContext(self.backend, Rectification(weights, coef))
        return self.unet(sample, timestep, encoder_hidden_states=embeddings,
                         cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if rectification is None:
            out = self._plain(sample, timestep, embeddings)
        else:
            out = self._guided(sample, timestep, embeddings, rectification.weights, rectification.coef)
        # a CUDA graph's output buffer is overwritten by its next replay: hand out a copy
        return out.clone() if self.cudagraphs else out
