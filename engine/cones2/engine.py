"""`Engine`: the API services embed. Checkpoint + residuals + layout -> image.

Data flows one way: prompt -> embeddings (+ residuals) -> layout maps -> sampler -> UNet runner
(attention backend) -> latents -> image. `generate` does one request; `generate_batch` runs several
compatible requests through one sampling loop (cross-request batching for the server).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image

from .config import SamplingConfig
from .modes import get_mode
from .embeddings import add_residuals, encode_prompts
from . import limits
from .errors import Cones2Error, quote
from .limits import MAX_PROMPT_CHARS, MAX_SUBJECTS  # re-exported: the bounds live in cones2.limits
from .image import decode_latents, png_info
from .layout import Layout, level_shapes
from .loading import Components, load_components, parse_device, parse_dtype
from .precision import default_dtype
from .residual import Residual
from .backends import ATTENTION, DEFAULT_ENV, RUNNER, default_backends, fallback, select_backend
from .runners import TorchUNetRunner, eager_runner_for, make_runner
from .reuse import StepPlan, shallow_supported
from .sampler import BatchInputs, NoiseStream, sample
from .schedule import guidance_log_terms, make_schedule
from .tokens import SEQ_LEN, Located, SubjectTokens, locate_subject, prompt_token_ids

log = logging.getLogger("cones2.engine")


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request. subjects: word in the prompt -> Residual. subject_positions: optional
    explicit token positions per subject (where its residual rows start; the reference's
    `subject_list`). layout: where subjects go, or None for no layout guidance. config: None = the
    model's defaults (its training resolution), filled in by the engine the same way in `check` and
    `generate_batch`. negative_prompt: what the unconditional branch encodes ("" = SPEC 2's U = E("")).
    allow_foreign_residuals: accept residuals whose recorded base-model fingerprint is another model's."""

    prompt: str
    subjects: Mapping[str, Residual] = field(default_factory=dict)
    layout: Layout | None = None
    config: SamplingConfig | None = None
    subject_positions: Mapping[str, list[int]] | None = None
    negative_prompt: str = ""
    allow_foreign_residuals: bool = False

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise Cones2Error("must be a non-empty string", "prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise Cones2Error(f"is longer than {MAX_PROMPT_CHARS} characters", "prompt")
        if not isinstance(self.negative_prompt, str):
            raise Cones2Error(f"must be a string, got {type(self.negative_prompt).__name__}", "negative_prompt")
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise Cones2Error(f"is longer than {MAX_PROMPT_CHARS} characters", "negative_prompt")
        if self.layout is not None and not isinstance(self.layout, Layout):
            raise Cones2Error(f"must be a cones2.Layout (Layout.from_boxes, from_masks or from_color_map), got "
                              f"{type(self.layout).__name__}", "layout")
        if self.config is not None and not isinstance(self.config, SamplingConfig):
            raise Cones2Error(f"must be a cones2.SamplingConfig, got {type(self.config).__name__}", "config")
        if not isinstance(self.subjects, Mapping):
            raise Cones2Error(f"must map subject word -> cones2.Residual, got {type(self.subjects).__name__}",
                              "subjects")
        names = set(self.subjects) | set(self.layout.names if self.layout else ())
        if len(names) > MAX_SUBJECTS:
            raise Cones2Error(f"{len(names)} subjects; at most {MAX_SUBJECTS} per image", "subjects")
        for name in self.subjects:
            limits.name(name, "subjects")
        for name, residual in self.subjects.items():
            if not isinstance(residual, Residual):
                raise Cones2Error(f"must be a cones2.Residual, got {type(residual).__name__}", f"subjects.{name}")
        for name in self.subject_positions or {}:
            if name not in self.subjects:
                raise Cones2Error(f"positions given for {quote(name)}, which has no residual", "subject_positions")
            limits.positions(self.subject_positions[name], f"subject_positions.{name}")

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampling loop (config filled in: `Engine.resolve`)."""
        c = self.config or SamplingConfig()
        return (c.height, c.width, c.steps, c.guidance_steps, c.mode, c.gate_step, c.cache_interval)


@dataclass
class Generation:
    """The result of one request: the image, the final latents (1, 4, h, w) and the conditional
    embeddings (1, 77, D) (CPU, float32), and the stage timings in seconds."""

    image: Image.Image
    latents: torch.Tensor
    cond_embeddings: torch.Tensor
    request: GenerationRequest
    timings: dict[str, float]
    subject_tokens: list[SubjectTokens]
    model_id: str = ""
    backend: str = ""

    @property
    def seed(self) -> int:
        return self.request.config.seed

    model_fingerprint: str = ""
    model_source: str = ""

    def parameters(self) -> dict:
        """Everything that produced this image, for PNG metadata and logs (`cones2.provenance`):
        enough to re-run it (`cones2-engine generate --from-png`)."""
        from .provenance import describe_generation

        return describe_generation(self)

    def png(self) -> bytes:
        """The image as PNG bytes carrying `parameters()` in its text metadata (the `cones2` JSON
        chunk, and A1111-style `parameters` text for other tools)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=png_info(self.parameters()))
        return buf.getvalue()


@dataclass
class _Prepared:
    cond: torch.Tensor                   # (77, D)
    uncond: torch.Tensor                 # (77, D)
    weights: dict[int, torch.Tensor] | None
    tokens: list[SubjectTokens]


class Engine:
    """A loaded checkpoint ready to generate.

    Build with `Engine.from_pretrained`. `backend` picks how the UNet runs (`cones2.backends`):
    an attention backend inside the PyTorch UNet (`reference`, `sdpa`, `triton`) or a UNet runner
    that replaces it (`onnxruntime`, `tensorrt`); None picks the best one that runs on `device`
    (`$CONES2_BACKEND` pins it): on CUDA `triton`, on the CPU `sdpa`. `onnxruntime` named without
    `onnx_dir` makes its export on first use and caches it per model.
    `backend_options` go to UNet runners (e.g. `onnx_dir`). `backend_reason` says why it was chosen.
    `compile=True` runs the PyTorch UNet through torch.compile (`cones2.compiled`: CUDA graphs on
    CUDA; the default is then the best attention backend); `warmup` compiles the graphs of given
    shapes ahead of time.
    Thread-safe: `check`, `encode` and `generate_batch` may be called from several threads.
    """

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype,
                 backend: str | None = None, backend_options: dict | None = None, compile: bool = False):
        from .attention import Cones2AttnProcessor

        self.components = components
        self.device, self.dtype = device, dtype
        self.unet.set_attn_processor(Cones2AttnProcessor())
        self._runners: dict[str, object] = {}
        # HF tokenizers keep per-call padding state: concurrent calls corrupt each other's lengths.
        # Every tokenizer call in the engine (and so in the service) goes through this one lock.
        self._tokenizer_lock = threading.RLock()
        self.compile = compile
        self._fingerprint: str | None = None
        self._warned: set[tuple[str, str]] = set()   # (subject, residual sha256) already warned about
        self._said_eager: set[str] = set()            # backends whose fast-mode split was logged
        self.load_timings: dict[str, float] = {}   # from_pretrained: seconds loading weights, starting the backend
        if backend is not None:
            self.default_backend, self.backend_reason = select_backend(device, backend)
            self._runners[backend] = make_runner(backend, self, compile=compile, **(backend_options or {}))
        else:
            self._start_default_backend(backend_options or {})

    def _start_default_backend(self, options: dict) -> None:
        """Build the best default backend for the device; when it cannot start (its cached export
        fails, say), log why and take the fallback its spec names (`cones2.backends.fallback`).
        A pinned `$CONES2_BACKEND` has no fallback. `compile` limits the choice to attention backends."""
        kinds = (ATTENTION,) if self.compile else (ATTENTION, RUNNER)
        name, reason = default_backends(self.device, kinds)[0]
        pinned = reason == f"${DEFAULT_ENV}"
        failed = []
        while True:
            try:
                self._runners[name] = make_runner(name, self, compile=self.compile, **options)
                break
            except Exception as exc:  # noqa: BLE001 - any failure of an optional default means: use its fallback
                nxt = None if pinned else fallback(name, self.device, kinds)
                if nxt is None:
                    raise
                log.warning("default backend %s could not start (%s: %s); using %s", name, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", nxt)
                failed.append(name)
                name, options = nxt, {}
        self.default_backend = name
        self.backend_reason = reason + (f" ({', '.join(failed)} could not start)" if failed else "")
        log.info("backend %s: %s", name, self.backend_reason)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, backend: str | None = None,
                        backend_options: dict | None = None, compile: bool = False,
                        model_config: str | os.PathLike | None = None) -> "Engine":
        """Load a diffusers-layout SD checkpoint (local dir or hub id) or a single-file one
        (`.safetensors`/`.ckpt`, original layout; `model_config`: a diffusers folder describing it when it
        is not SD 1.x/2.x); None = the embedded default model.
        dtype None = `cones2.precision.default_dtype(device)` (fp16 on CUDA, fp32 elsewhere).
        compile: torch.compile the UNet call (opt-in; `cones2.compiled`, docs/speed.md)."""
        from .default_model import default_model_dir

        dev = parse_device(device)
        dt = parse_dtype(default_dtype(dev) if dtype is None else dtype, dev)
        if backend is not None:
            select_backend(dev, backend)  # an unusable backend fails before the checkpoint loads
        start = time.perf_counter()
        components = load_components(path_or_hub_id if path_or_hub_id is not None else default_model_dir(), dev, dt,
                                     model_config)
        loaded = time.perf_counter()
        engine = cls(components, dev, dt, backend, backend_options, compile)
        engine.load_timings = {"load": loaded - start, "backend": time.perf_counter() - loaded}
        return engine

    @classmethod
    def from_pipeline(cls, pipe, *, backend: str | None = None, backend_options: dict | None = None,
                      compile: bool = False) -> "Engine":
        """An engine over an already-loaded diffusers `StableDiffusionPipeline` (SD 1.x/2.x), sharing
        its modules (no weights copied). The pipeline stays usable: the engine's attention processor
        computes plain attention exactly when the pipeline calls the UNet without a layout."""
        from .loading import PREDICTION_TYPES

        missing = [n for n in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise Cones2Error(f"the pipeline has no {', '.join(missing)}; a StableDiffusionPipeline is needed",
                              "pipeline")
        scheduler_config = dict(pipe.scheduler.config)
        if scheduler_config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise Cones2Error(f"prediction_type {scheduler_config['prediction_type']!r} is not supported "
                              "(epsilon or v_prediction)", "pipeline.scheduler")
        unet = pipe.unet
        device, dtype = unet.device, unet.dtype
        source = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None) or "pipeline"
        components = Components(pipe.tokenizer, pipe.text_encoder, unet, pipe.vae, scheduler_config, str(source),
                                f"pipeline@{type(pipe).__name__}")
        return cls(components, device, dtype, backend, backend_options, compile)

    # ---- model facts -----------------------------------------------------------------------------
    tokenizer = property(lambda self: self.components.tokenizer)
    text_encoder = property(lambda self: self.components.text_encoder)
    unet = property(lambda self: self.components.unet)
    vae = property(lambda self: self.components.vae)

    @property
    def text_dim(self) -> int:
        """D, the width of the text encoder's output (1024 for SD 2.x, 768 for SD 1.x)."""
        return self.text_encoder.config.hidden_size

    @property
    def fingerprint(self) -> str:
        """The weights' fingerprint (`cones2.loading.model_fingerprint`; computed once): what residuals
        record as their base model, and what each image records."""
        if self._fingerprint is None:
            from .loading import model_fingerprint

            self._fingerprint = model_fingerprint(self.text_encoder, self.unet)
        return self._fingerprint

    @property
    def prediction_type(self) -> str:
        return self.components.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The resolution the UNet was trained at (768 for SD 2.1, 512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_scale

    def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(h, w) of every attention resolution for an output of height x width pixels."""
        return level_shapes(height // self.vae_scale, width // self.vae_scale,
                            len(self.unet.config.block_out_channels))

    def runner(self, backend: str | None = None, **options):
        """The UNet runner for `backend` (built once, then reused; options rebuild it)."""
        name = backend or self.default_backend
        if name not in self._runners or options:
            select_backend(self.device, name)
            self._runners[name] = make_runner(name, self, compile=self.compile, **options)
        return self._runners[name]

    # ---- the pipeline ---------------------------------------------------------------------------
    def request(self, prompt: str, subjects: Mapping[str, Residual] | None = None, layout: Layout | None = None, *,
                subject_positions: Mapping[str, list[int]] | None = None, height: int | None = None,
                width: int | None = None, negative_prompt: str = "", allow_foreign_residuals: bool = False,
                **settings) -> GenerationRequest:
        """Build a validated request; `settings` are SamplingConfig fields (steps, seed, ...), a None
        one meaning the config's default; height/width None = the model's resolution. An explicit
        guidance_steps above the steps is an error (a config file's is clamped instead)."""
        size = self.default_resolution
        given = {k: v for k, v in settings.items() if v is not None}
        config = SamplingConfig(height=height or size, width=width or size, **given)
        limits.guidance_steps_within(given.get("guidance_steps"), config.steps)
        if subjects is not None and not isinstance(subjects, Mapping):
            raise Cones2Error(f"must map subject word -> cones2.Residual, got {type(subjects).__name__}", "subjects")
        return GenerationRequest(prompt, dict(subjects or {}), layout, config, subject_positions, negative_prompt,
                                 allow_foreign_residuals)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its config filled in from this model's defaults when it has none: `check` and
        `generate_batch` both judge a request through this, so they agree on its size."""
        if not isinstance(request, GenerationRequest):
            raise Cones2Error(f"must be a GenerationRequest, got {type(request).__name__}", "request")
        if request.config is not None:
            return request
        size = self.default_resolution
        return dataclasses.replace(request, config=SamplingConfig(height=size, width=size))

    def check(self, request: GenerationRequest) -> list[SubjectTokens]:
        """Validate `request` against this model: residual widths, every subject and layout word in
        the prompt (within its 77 tokens), residual rows against the word's tokens, every layout
        region still visible at the request's size. Raises `Cones2Error` naming the field; returns
        each subject's token positions (a `Located`: it also keeps the prompt's token ids, which
        `generate_batch(located=...)` encodes as they are). `generate` makes the same checks; a service
        calls this before queueing, so a bad request never joins a batch."""
        request = self.resolve(request)
        located = self._locate_subjects(request)
        if request.layout is not None:
            request.layout.masks(request.config.height, request.config.width)  # a vanished region is an error
        return located

    def _locate_subjects(self, request: GenerationRequest) -> Located:
        """Each subject's and layout word's token positions, with the residual checks of `check`."""
        with self._tokenizer_lock:
            ids = prompt_token_ids(self.tokenizer, request.prompt)
            explicit = request.subject_positions or {}
            tokens: dict[str, SubjectTokens] = {}
            for name, residual in request.subjects.items():
                residual.check_dim(self.text_dim, f"subjects.{name}")
                self._check_base_model(name, residual, request.allow_foreign_residuals)
                t = locate_subject(self.tokenizer, ids, name, explicit.get(name), prompt=request.prompt)
                if name not in explicit and residual.rows > len(t.token_ids):
                    raise Cones2Error(f"residual has {residual.rows} rows but {name!r} has {len(t.token_ids)} "
                                      "tokens", f"subjects.{name}")
                tokens[name] = t
            for name in request.layout.names if request.layout else ():
                if name not in tokens:
                    tokens[name] = locate_subject(self.tokenizer, ids, name, field="layout", prompt=request.prompt)
        return Located(tokens.values(), ids)

    def _check_base_model(self, name: str, residual: Residual, allow_foreign: bool) -> None:
        """A residual recorded as trained on other weights is refused (unless allowed); one whose
        recorded word is not the subject word it is given for gets a warning."""
        recorded = residual.base_fingerprint
        if recorded and recorded != self.fingerprint and not allow_foreign:
            raise Cones2Error(f"residual was trained on model {recorded} ({residual.base_model or 'unnamed'}), not "
                              f"this one ({self.fingerprint}); pass --allow-foreign-residual "
                              "(allow_foreign_residuals=True) to use it anyway", f"subjects.{name}")
        if residual.word and residual.word.lower() != name.lower() and (name, residual.sha256) not in self._warned:
            self._warned.add((name, residual.sha256))
            log.warning("subjects.%s: the residual was trained for the word %r, used here for %r",
                        name, residual.word, name)

    def generate(self, prompt: str, subjects: Mapping[str, Residual] | None = None, layout: Layout | None = None, *,
                 negative_prompt: str = "", seed: int | None = None, steps: int | None = None,
                 guidance_steps: int | None = None, guidance_weight: float | None = None,
                 cfg_scale: float | None = None, negative_weight: float | None = None, height: int | None = None,
                 width: int | None = None, mode: str | None = None, layout_resize: str | None = None,
                 gate_step: int | None = None, cache_interval: int | None = None, backend: str | None = None,
                 subject_positions: Mapping[str, list[int]] | None = None, progress: bool = True,
                 on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """Generate one image (SPEC 2-4). Returns a `Generation` (image, latents, embeddings, timings).

        subjects: word -> Residual, each word must occur in the prompt. layout: a `Layout` over
        subject words. The sampling settings are `SamplingConfig`'s fields; None (the default) means
        the config's default, written there once (seed 0, paper-exact, the mode's steps, ...), and
        height/width None the model's resolution. gate_step, cache_interval: fast mode's work reuse
        (`SamplingConfig`, docs/speed.md).
        on_step(i, n, latents) is called after each step; should_stop() is polled between UNet calls.
        negative_prompt: what the unconditional branch encodes ("" = SPEC 2's U = E(""), bit for bit).
        """
        req = self.request(prompt, subjects, layout, subject_positions=subject_positions, height=height, width=width,
                           negative_prompt=negative_prompt,
                           seed=seed, steps=steps, guidance_steps=guidance_steps, guidance_weight=guidance_weight,
                           cfg_scale=cfg_scale, negative_weight=negative_weight, mode=mode,
                           layout_resize=layout_resize, gate_step=gate_step, cache_interval=cache_interval)
        return self.generate_batch([req], backend=backend, progress=progress, on_step=on_step,
                                   should_stop=should_stop)[0]

    def generate_batch(self, requests: list[GenerationRequest], *, backend: str | None = None, progress: bool = True,
                       on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       located: list[list[SubjectTokens]] | None = None) -> list[Generation]:
        """Run compatible requests (same size, steps, guidance steps and mode) in one sampling loop;
        each result equals what `generate` gives for that request alone (per-sample std and noise).
        located: what `check` returned for each request, when the caller checked them already (a
        service does, before queueing): the prompts are then not searched for their subjects again."""
        if not requests:
            return []
        if located is not None and len(located) != len(requests):
            raise Cones2Error(f"{len(located)} token lists for {len(requests)} requests", "located")
        requests = [self.resolve(r) for r in requests]
        if len({r.batch_key() for r in requests}) != 1:
            raise Cones2Error("requests in one batch must share height, width, steps, guidance_steps and mode",
                              "requests")
        runner = self.runner(backend)
        c0 = requests[0].config
        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)

        with clock("prepare"):
            prepared = [self._prepare(r, runner, None if located is None else located[i])
                        for i, r in enumerate(requests)]
        with clock("schedule"):
            sched = self.components.scheduler_config
            schedule = make_schedule(c0.mode, c0.steps, sched.get("beta_start", 0.00085),
                                     sched.get("beta_end", 0.012), sched.get("beta_schedule", "scaled_linear"),
                                     sched.get("num_train_timesteps", 1000))
            log_terms = guidance_log_terms(c0.guidance_steps)
            inputs = self._batch_inputs(requests, prepared)
        with clock("sampling"):
            # shallow passes re-implement the plain SD forward; a UNet with extra embeddings runs every pass full
            interval = c0.cache_interval if shallow_supported(self.unet) else 1
            plan = StepPlan.make(c0.steps, c0.guidance_steps, c0.gate_step, interval)
            latents = sample(runner, inputs, schedule, log_terms, self.prediction_type, plan=plan,
                             eager=self._eager_for(runner, backend or self.default_backend, plan), progress=progress,
                             on_step=on_step, should_stop=should_stop)
        with clock("decode"):
            pixels = runner.decode(latents) if hasattr(runner, "decode") else self.decode(latents)
        timings["total"] = sum(timings.values())
        backend_name = backend or self.default_backend
        return [Generation(Image.fromarray(pixels[i]), latents[i : i + 1].cpu(), p.cond[None].float().cpu(), r,
                           dict(timings), p.tokens, self.components.model_id, backend_name, self.fingerprint,
                           self.components.source)
                for i, (r, p) in enumerate(zip(requests, prepared))]

    def _eager_for(self, runner, name: str, plan: StepPlan) -> TorchUNetRunner | None:
        """The eager PyTorch UNet that runs the passes of `plan` that reuse work when `runner` cannot
        (a compiled or exported UNet: it takes the plain passes), so `fast` gives the same image on
        every backend. Said once per backend in the log."""
        if not plan.reuses or isinstance(runner, TorchUNetRunner):
            return None
        eager = eager_runner_for(runner, self.unet)
        if name not in self._said_eager:
            self._said_eager.add(name)
            reusing = sum(not plan.plain(i) for i, _, _ in plan.unet_passes())
            log.info("fast mode: %s runs the plain UNet passes; the %d of %d that reuse work run on the eager "
                     "PyTorch UNet with %s attention (docs/speed.md)", name, reusing, len(plan.unet_passes()),
                     eager.name)
        return eager

    def warmup(self, resolutions: list[int | tuple[int, int]] | None = None, batch_sizes: list[int] = (1,), *,
               backend: str | None = None) -> dict[tuple[int, int, int], float]:
        """Compile ahead of time every graph and kernel the given shapes need: one tiny generation
        (2 steps, the first guided with a layout, so both the guided and the unguided UNet call run)
        per (resolution, batch size). resolutions: square sides or (height, width) in pixels
        (default: the model's resolution); batch_sizes: requests per sampling loop. Returns the
        seconds spent per (height, width, batch size); a second call finds everything compiled."""
        sizes = [(r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))
                 for r in (resolutions or [self.default_resolution])]
        layout = Layout.from_boxes({"warm": (0.0, 0.0, 0.5, 1.0)})
        spent = {}
        for height, width in sizes:
            for batch in batch_sizes:
                requests = [self.request("warm up", None, layout, height=height, width=width, steps=2,
                                         guidance_steps=1, seed=k) for k in range(batch)]
                start = time.perf_counter()
                self.generate_batch(requests, backend=backend, progress=False)
                spent[(height, width, batch)] = time.perf_counter() - start
        return spent

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (R, 4, h, w) -> uint8 images (R, H, W, 3)."""
        return decode_latents(self.vae, latents)

    def encode(self, prompts: list[str], backend: str | None = None) -> torch.Tensor:
        """E(p) for each prompt, (B, 77, D) in the model dtype. A compiled runner that carries its
        own text encoder (`encode_ids`) is used for it, so the whole pipeline runs its graphs."""
        encode_ids = getattr(self.runner(backend), "encode_ids", None)
        with self._tokenizer_lock:
            return encode_prompts(self.text_encoder, self.tokenizer, prompts, encode_ids)

    def _prepare(self, req: GenerationRequest, runner, located: list[SubjectTokens] | None = None) -> _Prepared:
        """Embeddings with residuals composed in, and the per-level weight maps, for one request
        (`located`: `check`'s answer for it, if already known)."""
        if located is None:
            located = self._locate_subjects(req)   # `check` without the region raster: weight_maps does that
        tokens = {t.name: t for t in located}
        with self._tokenizer_lock:     # the prompt's ids as `check` found them (a plain list has none)
            cond, uncond = encode_prompts(self.text_encoder, self.tokenizer, [req.prompt, req.negative_prompt],
                                          getattr(runner, "encode_ids", None),
                                          [getattr(located, "prompt_ids", None), None])
        cond = add_residuals(cond, [(tokens[n], r) for n, r in req.subjects.items()])
        weights = None
        if req.layout is not None:
            c = req.config
            weights = req.layout.weight_maps({n: t.word_positions for n, t in tokens.items()}, c.height, c.width,
                                             self.level_shapes(c.height, c.width), c.negative_weight, SEQ_LEN,
                                             self.device, resize=c.layout_resize)
        return _Prepared(cond, uncond, weights, list(tokens.values()))

    def _batch_inputs(self, requests: list[GenerationRequest], prepared: list[_Prepared]) -> BatchInputs:
        c0 = requests[0].config
        shape = (1, self.unet.config.in_channels, c0.height // self.vae_scale, c0.width // self.vae_scale)
        weights = None
        if any(p.weights is not None for p in prepared):
            levels = [h * w for h, w in self.level_shapes(c0.height, c0.width)]
            weights = {n: torch.stack([p.weights[n] if p.weights is not None
                                       else torch.zeros(n, SEQ_LEN, device=self.device) for p in prepared])
                       for n in levels}
        guidance = [r.config.guidance_weight if p.weights is not None else 0.0 for r, p in zip(requests, prepared)]
        return BatchInputs(
            cond=torch.stack([p.cond for p in prepared]), uncond=torch.stack([p.uncond for p in prepared]),
            weights=weights,
            guidance_weight=torch.tensor(guidance, dtype=torch.float32, device=self.device),
            cfg_scale=torch.tensor([r.config.cfg_scale for r in requests], dtype=torch.float32, device=self.device),
            noise=[NoiseStream(r.config.seed, shape, self.device, get_mode(r.config.mode).cpu_noise)
                   for r in requests],
        )


class _Clock:
    """Stage timer: `with clock("stage"):` adds wall seconds to timings[stage] (syncs CUDA at the edges only)."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings

    def __call__(self, stage: str):
        self.stage = stage
        return self

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

