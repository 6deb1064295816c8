"""Work reuse for `fast` mode: skip UNet work the image no longer needs (docs/speed.md, issue 24).

Two techniques, both on diffusers' `UNet2DConditionModel` blocks, both off in `paper-exact`:

- Cached cross-attention (the T-GATE finding: text cross-attention converges early). From the gate
  step on, every cross-attention layer returns the conditional output it computed on the last full
  CFG pass before the gate, and the unconditional branch is dropped: one UNet call of batch R
  instead of 2R, without the text attention.
- Deep-feature reuse (the DeepCache finding: the deep features change slowly between adjacent
  steps). A full pass keeps the output of the second-to-last up block; a shallow pass runs only
  conv_in, the first down block, the last up block and conv_out on top of those kept features.

`StepPlan` says which steps do what; `ReusingRunner` executes the passes of a plan that reuse work
on the eager PyTorch UNet. A plan's plain passes (full CFG pairs that record nothing) can run on any
runner, so a compiled or exported UNet takes those and the image stays the same (docs/speed.md).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .attention import AttentionContext, Rectification

FULL, SHALLOW = "full", "shallow"


@dataclass(frozen=True)
class StepPlan:
    """Per-step work of one sampling loop of `steps` steps.

    guided: steps 0..G-1 (layout guidance and self-recurrence, always full CFG passes).
    gate: first step of the conditional-only tail with cached cross-attention (= steps: no tail).
    cache_interval: among unguided steps, a full pass every `cache_interval` steps (counted from G
    and again from the gate), shallow passes in between (1: every pass is full).
    """

    steps: int
    guided: int
    gate: int
    cache_interval: int

    @classmethod
    def make(cls, steps: int, guided: int, gate: int, cache_interval: int) -> "StepPlan":
        return cls(steps, guided, min(steps, max(gate, guided, 1)), max(1, cache_interval))

    def cfg(self, i: int) -> bool:
        """Both CFG branches at step i (else: the conditional branch only, cached cross-attention)."""
        return i < self.gate

    def depth(self, i: int) -> str:
        """FULL or SHALLOW pass at step i. The step before a tail is full (it records the
        cross-attention the tail reuses), and so are the first step after the guided window and
        the gate step (the kept features restart there)."""
        if i < self.guided or self.records_cross_attention(i) or self.cache_interval == 1:
            return FULL
        start = self.gate if i >= self.gate else self.guided
        return FULL if (i - start) % self.cache_interval == 0 else SHALLOW

    def plain(self, i: int) -> bool:
        """Step i is an ordinary full CFG-pair pass that records nothing: any UNet runner can take it."""
        return (self.cfg(i) and self.depth(i) == FULL and not self.records_cross_attention(i)
                and not self.records_deep_features(i))

    def records_cross_attention(self, i: int) -> bool:
        return self.gate < self.steps and i == self.gate - 1

    def records_deep_features(self, i: int) -> bool:
        return self.depth(i) == FULL and i + 1 < self.steps and self.depth(i + 1) == SHALLOW

    @property
    def reuses(self) -> bool:
        return self.gate < self.steps or self.cache_interval > 1

    def unet_passes(self) -> list[tuple[int, bool, str]]:
        """(step, both CFG branches, FULL/SHALLOW) of every UNet call in order (guided steps twice)."""
        out = []
        for i in range(self.steps):
            out += [(i, self.cfg(i), self.depth(i))] * (2 if i < self.guided else 1)
        return out


@dataclass(frozen=True)
class ReuseContext(AttentionContext):
    """An `AttentionContext` that also tells the cross-attention layers to record or replay."""

    cross_cache: "CrossAttentionCache | None" = None


class CrossAttentionCache:
    """Conditional cross-attention outputs per layer: recorded on one full CFG pass (batch 2R, the
    first R rows are the conditional branch), replayed on conditional-only passes (batch R)."""

    def __init__(self, batch: int):
        self.batch, self.recording, self.outputs = batch, False, {}

    def __call__(self, key: int, compute) -> torch.Tensor:
        if self.recording:
            out = compute()
            self.outputs[key] = out[: self.batch]
            return out
        return self.outputs[key]


class CachingCrossAttnProcessor:
    """Wraps a cross-attention layer's processor: without a `ReuseContext` (every paper-exact call)
    it calls the wrapped processor unchanged."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 attention_context: AttentionContext | None = None):
        def compute():
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              attention_context=attention_context)

        cache = getattr(attention_context, "cross_cache", None)
        return compute() if cache is None else cache(id(attn), compute)


def install_cross_attention_cache(unet) -> None:
    """Wrap every cross-attention layer's processor once (idempotent; transparent without a cache)."""
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "processor"):
            if not isinstance(module.processor, CachingCrossAttnProcessor):
                module.processor = CachingCrossAttnProcessor(module.processor)


def shallow_supported(unet) -> bool:
    """The shallow pass re-implements the outer part of the plain SD UNet forward: no class,
    addition or GLIGEN embeddings, no input centring."""
    c = unet.config
    return (c.class_embed_type is None and c.addition_embed_type is None and not c.center_input_sample
            and getattr(unet, "encoder_hid_proj", None) is None and len(unet.up_blocks) >= 2)


class ReusingRunner:
    """Runs the passes of a `StepPlan` that reuse work on a `TorchUNetRunner`'s diffusers UNet and
    attention backend (the eager PyTorch UNet: its blocks are called one by one)."""

    def __init__(self, runner, batch: int):
        self.unet, self.backend = runner.unet, runner.backend
        install_cross_attention_cache(self.unet)
        self.cross = CrossAttentionCache(batch)
        self.batch = batch
        self.deep: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None, *, cfg: bool, depth: str, record_cross: bool,
                 record_deep: bool) -> torch.Tensor:
        self.cross.recording = record_cross
        context = ReuseContext(self.backend, rectification, None if (cfg and not record_cross) else self.cross)
        kwargs = {"attention_context": context}
        if depth == SHALLOW:
            deep = self.deep if self.deep.shape[0] == sample.shape[0] else self.deep[: sample.shape[0]]
            return self._shallow(sample, timestep, embeddings, kwargs, deep)
        hook = self.unet.up_blocks[-2].register_forward_hook(self._keeper()) if record_deep else None
        try:
            return self.unet(sample, timestep, encoder_hidden_states=embeddings, cross_attention_kwargs=kwargs,
                             return_dict=False)[0]
        finally:
            if hook is not None:
                hook.remove()

    def _keeper(self):
        """The hook that keeps this pass's deep features. It sits on the engine's shared UNet while
        the pass runs, so it ignores forwards of other threads (another generation on this engine)."""
        owner = threading.get_ident()

        def keep(_module, _inputs, output):
            if threading.get_ident() == owner:
                self.deep = output
        return keep

    def _shallow(self, sample, timestep, embeddings, kwargs, deep):
        """conv_in, the first down block, the last up block on `deep`, conv_out: diffusers'
        UNet2DConditionModel.forward restricted to the outermost level (same calls, same order)."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h = unet.conv_in(sample)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=h, temb=emb, encoder_hidden_states=embeddings, cross_attention_kwargs=kwargs)
        else:
            _, res = first(hidden_states=h, temb=emb)
        res = ((h,) + tuple(res))[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=embeddings,
                       cross_attention_kwargs=kwargs)
        else:
            out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=res)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)
