"""Learn one subject's residual (SPEC section 1): tune a copy of the text encoder, then extract.

Only the copy E' trains (all its weights, fp32, AdamW); the UNet and VAE are frozen and never get
weight gradients, E0 is the frozen original. Each step draws a cached image latent, noise and a
timestep from one seeded generator, runs E'(s) -> UNet on the noisy latent, and minimises the
denoising MSE plus the SPEC 1.3 regulariser. The backward pass runs in two calls (UNet down to the
text embedding, then the text encoder), which is the same chain rule and lets profiling split them.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import cones2
from cones2 import Cones2Error, Residual
from cones2.loading import Components, load_components, model_fingerprint, parse_device
from cones2.tokens import SEQ_LEN, prompt_token_ids, word_token_ids

from .checkpoint import CheckpointState, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import LatentCache, fingerprint, load_images, to_pixels
from .interrupt import DeferredSigint, TrainingInterrupted
from .objective import DenoisingObjective
from .profiling import PhaseTimer
from .regularizer import embedding_preservation
from .residual_extraction import extract_residual
from .templates import captions_for, load_templates

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOG_EVERY = 10  # steps between loss read-backs (a host sync) for the progress bar
MAX_WORD_TOKENS = SEQ_LEN - 2


def train_residual(model, images, word: str, config: TrainConfig | None = None, *, progress: bool = True,
                   should_stop: Callable[[], bool] | None = None,
                   on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> Residual:
    """Train a subject residual from a few images and return it (SPEC 1).

    model: a diffusers-layout SD directory or hub id, None (the embedded default model), or already
    loaded components (`cones2.loading.Components`, or a `cones2.Engine`). images: a folder of
    jpg/png/webp files, or a list of paths / PIL images. word: the subject's base word (k >= 1 tokens).
    should_stop() is polled between steps; on_step(step, total, loss) is called after each.
    Ctrl-C (or should_stop) saves a checkpoint to `config.checkpoint_dir` and raises TrainingInterrupted.
    """
    trainer = Trainer(model, images, word, config)
    return trainer.train(progress=progress, should_stop=should_stop, on_step=on_step)


# Resume keys added after checkpoints were first written, with the value those checkpoints implied.
_BEFORE_IT_WAS_RECORDED = {"train_prompt": "{}"}


class Trainer:
    """One training run, set up and validated in the constructor; `train()` runs it.

    Everything a user can get wrong (images, word, templates, resolution, model, resume) is checked
    here, before the first step. Attributes after setup: `tuned` (E'), `frozen` (E0), `components`,
    `step` (completed steps), `timer` (per-phase seconds when `profile=True`).
    """

    def __init__(self, model, images, word: str, config: TrainConfig | None = None, *, profile: bool = False):
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise Cones2Error(f"must be a cones2_train.TrainConfig, got {type(config).__name__}", "config")
        if not isinstance(word, str):
            raise Cones2Error(f"must be a string, got {type(word).__name__}", "word")
        if not word.strip():
            raise Cones2Error(f"{word!r} tokenizes to nothing (give the subject's base word, e.g. dog)", "word")
        self.config, self.word = config, word.strip()
        if config.resume:
            resolve_checkpoint(config.resume)                   # a missing checkpoint fails before the model loads
        templates = load_templates(config.templates)
        pil_images = load_images(images)

        self.components, self.device, self.dtype = _components(model, config)
        c = self.components
        self.unet, self.vae, self.tokenizer = c.unet, c.vae, c.tokenizer
        self.timer = PhaseTimer(self.device, profile)

        self.resolution = _resolution(config.resolution, self.unet, self.vae)
        self.word_ids = word_token_ids(self.tokenizer, self.word, "word")
        self.k = len(self.word_ids)
        if self.k > MAX_WORD_TOKENS:
            raise Cones2Error(f"{self.word!r} is {self.k} tokens; at most {MAX_WORD_TOKENS} fit a prompt", "word")
        ids = prompt_token_ids(self.tokenizer, self.word)
        if ids[1 : 1 + self.k] != self.word_ids:
            raise Cones2Error(f"{self.word!r} does not tokenize the same inside a prompt", "word")
        start = 1
        if config.train_prompt != "{}":   # opt-in context around the word (TrainConfig.train_prompt)
            prompt = captions_for(self.tokenizer, [config.train_prompt], self.word, self.word_ids, "train_prompt")[0]
            ids, start = list(prompt.token_ids), prompt.start
        # the regulariser holds token 0 and everything after the word: tokens 1..free_tokens are free
        self.free_tokens = start - 1 + self.k
        self.prompt_ids = torch.tensor([ids], device=self.device)                      # (1, 77)
        self.captions = captions_for(self.tokenizer, templates, self.word, self.word_ids)
        self.templates = templates

        pixels = to_pixels(pil_images, self.resolution)                                # (N, 3, R, R)
        self.num_images, self.images_sha256 = pixels.shape[0], fingerprint(pixels)
        self.objective = DenoisingObjective.from_scheduler_config(c.scheduler_config, self.device)

        # E0 stays frozen (fp32 for exact residuals); E' is a trainable fp32 copy in eval mode (the
        # SD text encoders have no dropout, so the run depends on our seeded generator alone).
        frozen = c.text_encoder
        if next(frozen.parameters()).dtype != torch.float32:
            frozen = copy.deepcopy(frozen).float()
        self.frozen = frozen.eval().requires_grad_(False)
        self.tuned = copy.deepcopy(self.frozen).requires_grad_(True)
        with torch.no_grad(), self._autocast():
            self.frozen_prompt = self.frozen(self.prompt_ids)[0][0].float()            # E0(s), (77, D)

        # fused AdamW: one kernel over all of E', same update rule, several times faster than the per-tensor
        # loop (bench/train_speed.py --compare-optimizers)
        self.optimizer = torch.optim.AdamW(self.tuned.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=config.weight_decay,
                                           fused=True if self.device.type in ("cpu", "cuda") else None)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step = 0
        self.last_loss: float | None = None
        self._perms: dict[int, torch.Tensor] = {}

        if config.resume:
            self._resume(config.resume)
        else:
            with self.timer("vae_cache"):
                self.latents = LatentCache.encode(self.vae, pixels, self.device)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, *, progress: bool = True, should_stop: Callable[[], bool] | None = None,
              on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> Residual:
        """Run the remaining steps, then return the residual (see `train_residual`)."""
        total, cfg = self.config.steps, self.config
        bar = tqdm(total=total, initial=min(self.step, total), disable=not progress, unit="step",
                   desc=f"cones2-train {self.word}", dynamic_ncols=True)
        running, count = torch.zeros((), device=self.device), 0
        try:
            with DeferredSigint() as sigint, self._gradient_checkpointing():
                while self.step < total:
                    if sigint.requested or (should_stop is not None and should_stop()):
                        path = self.save_checkpoint() if cfg.checkpoint_dir else None
                        raise TrainingInterrupted(self.step, total, path)
                    loss = self._train_step()
                    self.step += 1
                    running += loss
                    count += 1
                    if count == LOG_EVERY or self.step == total:
                        self._log(bar, running.item() / count)
                        running.zero_()
                        count = 0
                    bar.update(1)
                    if on_step is not None:
                        on_step(self.step, total, loss)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                        self.save_checkpoint(keep=cfg.keep_checkpoints)
        finally:
            bar.close()
        return self.residual()

    def _train_step(self) -> torch.Tensor:
        """One optimizer step of SPEC 1.2-1.4; returns the (detached) total loss, a 0-dim tensor."""
        cfg, timer, g = self.config, self.timer, self.generator
        with timer("data"):
            idx = self._image_indices(self.step)
            x0 = self.latents.sample(idx, g)                                              # (B, 4, h, w)
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            t = torch.randint(0, self.objective.num_timesteps, (idx.shape[0],), generator=g, device=self.device)
            noisy, target = self.objective.noisy_and_target(x0, noise, t)
        with timer("text_encoder_forward"):
            with self._autocast():
                enc = self.tuned(self.prompt_ids)[0]                                       # E'(s), (1, 77, D)
            reg = embedding_preservation(enc[0], self.frozen_prompt, self.free_tokens, cfg.reg_first, cfg.reg_rest)
        enc_leaf = enc.detach().requires_grad_(True)
        with timer("unet_forward"):
            with self._autocast():
                context = enc_leaf.expand(idx.shape[0], -1, -1)
                if not self._autocast_enabled:
                    context = context.to(self.unet.dtype)
                pred = self.unet(noisy.to(self.unet.dtype), t, context).sample
            mse = F.mse_loss(pred.float(), target)
        with timer("unet_backward"):
            (grad_enc,) = torch.autograd.grad(self._scaled(mse), enc_leaf)
        with timer("text_encoder_backward"):
            torch.autograd.backward([enc, self._scaled(reg)], [grad_enc, None])
        with timer("optimizer"):
            params = list(self.tuned.parameters())
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return (mse + reg).detach()

    def _image_indices(self, step: int) -> torch.Tensor:
        """The batch's image indices (B,): epochs are seeded permutations, a function of (seed, step)."""
        b, n = self.config.batch_size, self.num_images
        out = []
        for j in range(step * b, step * b + b):
            epoch, r = divmod(j, n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.from_numpy(np.random.default_rng([self.config.seed, epoch]).permutation(n))}
            out.append(int(self._perms[epoch][r]))
        return torch.tensor(out, device=self.device)

    def _log(self, bar, loss: float) -> None:
        if not np.isfinite(loss):
            raise Cones2Error(f"the loss became {loss} at step {self.step}; lower the learning rate or use "
                              "bf16/fp32", "lr")
        self.last_loss = loss
        bar.set_postfix(loss=f"{loss:.4g}")

    # ---- outputs -------------------------------------------------------------------------------
    def residual(self) -> Residual:
        """The SPEC 1.5 residual of the current E', with its metadata."""
        with self.timer("residual_extraction"):
            emb = extract_residual(self.tuned, self.frozen, self.captions, self.k)
        c, cfg = self.config, self.components
        meta = {
            "trainer": "cones2_train", "version": cones2.__version__, "steps": self.step, "lr": c.lr,
            "seed": c.seed, "batch_size": c.batch_size, "resolution": self.resolution, "reg_first": c.reg_first,
            "reg_rest": c.reg_rest, "train_prompt": c.train_prompt, "grad_clip": c.grad_clip, "weight_decay": c.weight_decay,
            "dtype": _dtype_name(self.dtype), "prediction_type": self.objective.prediction_type,
            "images": self.num_images, "images_sha256": self.images_sha256, "templates": len(self.templates),
            "templates_sha256": hashlib.sha256("\n".join(self.templates).encode()).hexdigest(),
            "base_model_path": cfg.source, "text_encoder_sha256": _state_dict_sha256(self.frozen),
            "base_fingerprint": model_fingerprint(self.frozen, cfg.unet),   # checked by the engine at use
        }
        return Residual(emb, word=self.word, token_ids=self.word_ids, base_model=cfg.model_id, metadata=meta)

    def save_encoder(self, directory: str | os.PathLike) -> None:
        """Write the tuned text encoder (and the tokenizer) with save_pretrained, for inspection."""
        self.tuned.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_checkpoint(self, keep: int | None = None):
        """Write a resumable checkpoint of the current step to `config.checkpoint_dir`; returns its folder."""
        state = CheckpointState(
            step=self.step, info=self._resume_info(), text_encoder=self.tuned.state_dict(),
            optimizer=self.optimizer.state_dict(), rng={"generator": self.generator.get_state()},
            latents={"mean": self.latents.mean, "std": self.latents.std},
            scaler=self.scaler.state_dict() if self.scaler is not None else None)
        return save_checkpoint(self.config.checkpoint_dir, state, keep)

    # ---- resume --------------------------------------------------------------------------------
    def _resume_info(self) -> dict:
        """What must be equal between the run that saved a checkpoint and the one resuming it."""
        c = self.config
        return {"word": self.word, "token_ids": self.word_ids, "base_model": self.components.model_id,
                "images_sha256": self.images_sha256, "resolution": self.resolution, "batch_size": c.batch_size,
                "lr": c.lr, "reg_first": c.reg_first, "reg_rest": c.reg_rest, "train_prompt": c.train_prompt,
                "grad_clip": c.grad_clip,
                "weight_decay": c.weight_decay, "seed": c.seed, "dtype": _dtype_name(self.dtype),
                "device_type": self.device.type, "prediction_type": self.objective.prediction_type}

    def _resume(self, path: str) -> None:
        state = load_checkpoint(path)
        mine = self._resume_info()
        for key, value in mine.items():
            if state.info.get(key, _BEFORE_IT_WAS_RECORDED.get(key)) != value:
                raise Cones2Error(f"checkpoint was made with {key}={state.info.get(key)!r}, this run has "
                                  f"{key}={value!r}", "resume")
        try:
            self.tuned.load_state_dict(state.text_encoder)
            self.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise Cones2Error(f"checkpoint does not fit this model: {exc}".splitlines()[0], "resume") from None
        self.generator.set_state(state.rng["generator"])
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        mean, std = (state.latents[k].to(self.device).contiguous() for k in ("mean", "std"))
        self.latents = LatentCache(mean, std, float(self.vae.config.scaling_factor),
                                   float(getattr(self.vae.config, "shift_factor", None) or 0.0))
        self.step = state.step

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def _autocast_enabled(self) -> bool:
        return self.dtype != torch.float32

    def _autocast(self):
        if not self._autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    @contextlib.contextmanager
    def _gradient_checkpointing(self):
        enable = self.config.gradient_checkpointing and not getattr(self.unet, "is_gradient_checkpointing", False)
        if enable:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if enable:
                self.unet.disable_gradient_checkpointing()


def _components(model, config: TrainConfig) -> tuple[Components, torch.device, torch.dtype]:
    """Load (or adopt) the checkpoint; returns it with the training device and autocast dtype."""
    given = model.components if hasattr(model, "components") and isinstance(model.components, Components) else model
    if isinstance(given, Components):
        device = next(given.unet.parameters()).device
        if config.device is not None and parse_device(config.device) != device:
            raise Cones2Error(f"the given model lives on {device}, not {config.device}", "device")
        unet_dtype = next(given.unet.parameters()).dtype
        dtype = _dtype(config.dtype, device) if config.dtype or unet_dtype == torch.float32 else unet_dtype
        if dtype == torch.float32 and unet_dtype != torch.float32:
            raise Cones2Error(f"the given UNet is {unet_dtype}; train it with fp16/bf16 or pass fp32 weights", "dtype")
        for module in (given.unet, given.vae):
            module.eval().requires_grad_(False)
        return given, device, dtype
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise Cones2Error(f"expected a path, hub id, Components or Engine, got {type(model).__name__}", "model")
    if config.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(config.device)
    dtype = _dtype(config.dtype, device)
    if model is None:
        from cones2.default_model import default_model_dir

        model = default_model_dir()
    components = load_components(model, device, torch.float32)
    if dtype != torch.float32 and not getattr(components.unet, "_keep_in_fp32_modules", None):
        # frozen, so it runs in the training precision; the VAE stays fp32 (one-off). Plain Module.to:
        # diffusers' override warns on every dtype cast, even with no module to keep in fp32.
        torch.nn.Module.to(components.unet, dtype)
    return components, device, dtype


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise Cones2Error("fp16 autocast needs a CUDA device; use fp32 or bf16 on the CPU", "dtype")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _resolution(requested: int | None, unet, vae) -> int:
    """The training size: `requested` or the UNet's own; it must be a multiple of what the model downsamples."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_scale = 2 ** (len(unet.config.down_block_types) - 1)
    multiple = vae_scale * unet_scale
    sample = unet.config.sample_size
    native = (sample if isinstance(sample, int) else max(sample)) * vae_scale
    resolution = native if requested is None else requested
    if resolution % multiple:
        raise Cones2Error(f"{resolution} px does not suit this model: use a multiple of {multiple} (VAE downsamples "
                          f"by {vae_scale}, the UNet by {unet_scale} more)", "resolution")
    return resolution


def _state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's parameter names and fp32 bytes (identifies the base text encoder)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
