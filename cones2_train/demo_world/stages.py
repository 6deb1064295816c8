"""The three training stages of the demo model: VAE, text-encoder warm-up, text encoder + UNet.

Each stage reads the finished artefacts of the stages before it from `OUT/stages/`, resumes from
`OUT/checkpoints/<stage>/` when asked, and writes `OUT/stages/<stage>.safetensors` when done
(weights + JSON metadata: recipe fingerprint, steps, seconds in steps). All randomness (scenes,
noise, timesteps, caption dropout) comes from seeded generators saved in the checkpoints, so a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cones2 import Cones2Error
from cones2.layout import level_shapes

from . import models
from .data import (COLOUR_LIST, CaptionTable, caption_table, empty_caption_ids, encode_latents, object_weights,
                   scenes, to_pixels)
from .grounding import RecordingAttnProcessor, grounding_loss
from .guided_training import MAX_MARGIN, guided_coefficients, rectification_maps
from .loop import run_steps
from .recipe import STAGES, Recipe
from .state import load_state, save_state
from .world import IMAGE_SIZE, PATTERNS, make_scene

VAE_SCENE_OFFSET = 1       # the VAE sees scenes of seed + 1: a stream apart from the UNet's dataset


@dataclass
class Run:
    """Where a run writes and how it reports. out: the --out folder."""

    out: Path
    recipe: Recipe
    progress: bool = True
    resume: bool = False
    save_every: int = 200
    should_stop: object = None

    def artefact(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.safetensors"

    def checkpoint(self, stage: str) -> Path:
        return self.out / "checkpoints" / stage

    def finished(self, stage: str) -> dict | None:
        """The metadata of a finished artefact made by this recipe with its step count, else None."""
        meta = read_meta(self.artefact(stage))
        r = self.recipe
        if (meta and meta.get("fingerprint") == r.fingerprint(stage) and meta.get("steps") == r.steps(stage)
                and meta.get("cooldown", 0) == r.cooldown(stage) and meta.get("guided", None) == guided_meta(r, stage)):
            return meta
        return None

    def require(self, stage: str) -> tuple[dict[str, torch.Tensor], dict]:
        if self.finished(stage) is None:
            raise Cones2Error(f"the {stage} stage of this recipe has not finished in {self.out} "
                              f"(run --stage {stage} first)", "stage")
        return load_file(self.artefact(stage)), read_meta(self.artefact(stage))


def read_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}"))


def write_artefact(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"info": json.dumps(meta)})
    tmp.replace(path)


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def lr_at(step: int, peak: float, warmup: int, steps: int | None = None, cooldown: int = 0) -> float:
    """Linear warm-up, then constant (a constant rate lets a finished run be extended); with a
    cooldown, linear decay over the last `cooldown` of `steps` (step steps - cooldown runs at the peak,
    the last step at peak / cooldown)."""
    rate = peak * min(1.0, (step + 1) / max(1, warmup))
    if cooldown and steps is not None and step >= steps - cooldown:
        rate *= (steps - step) / cooldown
    return rate


def guided_meta(recipe: Recipe, stage: str) -> dict | None:
    """How an artefact records guided training: {"tail", "fraction"}, or None without it."""
    start = recipe.guided_start(stage)
    return None if start is None else {"tail": recipe.steps(stage) - start, "fraction": recipe.guided_fraction}


def check_schedule(recipe: Recipe, stage: str, step: int, saved: dict) -> None:
    """A checkpoint at `step` continues under this recipe only if both trained every step before it
    alike: for each tail phase (learning-rate decay, guided training), neither had begun, or both
    began at the same step with the same settings. saved: the checkpoint's `tail_phases`."""
    now = recipe.tail_phases(stage)
    phases = ((("decay_start",), "cooldown", "a constant rate", "a decay from step {decay_start}"),
              (("guided_start", "guided_fraction"), "guided-tail", "no guided training",
               "guided training of {guided_fraction} of the samples from step {guided_start}"))
    for keys, flag, off, on in phases:
        old, new = ({k: d.get(k) for k in keys} for d in (saved, now))
        began = [d[keys[0]] for d in (old, new) if d[keys[0]] is not None and d[keys[0]] < step]
        if began and old != new:
            def says(d):
                return off if d[keys[0]] is None else on.format(**d)

            raise Cones2Error(f"the {stage} checkpoint at step {step} was trained with {says(old)}; this recipe has "
                              f"{says(new)} (--{flag} must match once it has begun)", flag.replace("-", "_"))


def _stage_loop(run: Run, stage: str, params: dict[str, torch.nn.Module], optimizer, generator, step_fn,
                ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Resume if asked (weights, optimizer, generator and EMA are restored in place), run the steps,
    return the loop's info."""
    r = run.recipe
    fp, ckpt = r.fingerprint(stage), run.checkpoint(stage)
    start, info = 0, {}
    if (ckpt / "state.json").is_file():
        if not run.resume:
            raise Cones2Error(f"{ckpt} holds an earlier {stage} run; pass --resume to continue it, or use a new --out",
                              "resume")
        state = load_state(ckpt, stage, fp)
        if state["step"] > r.steps(stage):
            raise Cones2Error(f"the checkpoint is at step {state['step']}, past --steps {r.steps(stage)}", "steps")
        check_schedule(r, stage, state["step"], state["info"])
        for prefix, module in params.items():
            module.load_state_dict(unprefixed(prefix, state["weights"]))
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if ema is not None:                                  # in place: the step function holds this dict
            for k, v in state["ema"].items():
                ema[k].copy_(v)
        start, info = state["step"], state["info"]

    def save(step, info_now):
        weights = {}
        for prefix, module in params.items():
            weights.update(prefixed(prefix, module))
        save_state(ckpt, stage=stage, step=step, fingerprint=fp, weights=weights, optimizer=optimizer,
                   generator=generator, ema=ema, info={**info_now, **r.tail_phases(stage)})

    return run_steps(stage, start, r.steps(stage), step_fn, save, log_path=run.out / "log.jsonl", info=info,
                     save_every=run.save_every, progress=run.progress, should_stop=run.should_stop)


def _finish(run: Run, stage: str, tensors: dict[str, torch.Tensor], info: dict, **extra) -> dict:
    r = run.recipe
    steps = r.steps(stage)
    meta = {"fingerprint": r.fingerprint(stage), "steps": steps, "seconds": round(info.get("seconds", 0.0), 2),
            "ms_per_step": round(1000 * info.get("seconds", 0.0) / max(1, steps), 1),
            "cpu_ms_per_step": round(1000 * info.get("cpu_seconds", 0.0) / max(1, steps), 1),
            "threads": torch.get_num_threads(), "losses": info.get("losses", {}), **extra}
    if r.cooldown(stage):
        meta["cooldown"] = r.cooldown(stage)
    if guided_meta(r, stage) is not None:
        meta["guided"] = guided_meta(r, stage)
    write_artefact(run.artefact(stage), tensors, meta)
    return meta


# ---- stage 1: VAE ---------------------------------------------------------------------------------------
def train_vae(run: Run) -> dict:
    """Reconstruction of fresh scenes: object-weighted L1 + a small KL; then the latent scale."""
    r = run.recipe
    vae = models.build_vae(r).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(r.seed + 101)

    def step(i: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(i, r.vae_lr, r.warmup_steps)
        batch = [make_scene(r.seed + VAE_SCENE_OFFSET, i * r.vae_batch + j) for j in range(r.vae_batch)]
        x = to_pixels([s.render() for s in batch])
        weight = object_weights(batch, x, r.vae_object_weight)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=generator)).sample
        rec = (weight * (y - x).abs()).mean() / weight.mean()
        kl = post.kl().mean()
        loss = rec + r.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), r.grad_clip)
        optimizer.step()
        return {"l1": float(rec.detach()), "kl": float(kl.detach())}

    info = _stage_loop(run, "vae", {"vae": vae}, optimizer, generator, step)
    vae.eval()
    scale = latent_scale(vae, r.seed, r.scale_samples)
    return _finish(run, "vae", prefixed("vae", vae), info, scaling_factor=scale)


def import_vae(run: Run, model_dir: str | Path) -> dict:
    """Make `model_dir`'s VAE this run's finished vae stage, when that model's recipe.json shows the
    same vae fingerprint and step count (the VAE always learns on the v1 world, so a v2 run can
    reuse the v1 model's VAE: hours of CPU on a busy machine). The weights are the model's own (fp16
    values in fp32), i.e. exactly the VAE that model decodes with."""
    from diffusers import AutoencoderKL

    r, model_dir = run.recipe, Path(model_dir)
    try:
        source = json.loads((model_dir / "recipe.json").read_text())["stages"]["vae"]
    except (OSError, ValueError, KeyError):
        raise Cones2Error(f"{model_dir} has no recipe.json with a vae stage (not a demo model)", "vae-from") from None
    if source.get("fingerprint") != r.fingerprint("vae") or source.get("steps") != r.vae_steps:
        raise Cones2Error(f"{model_dir}'s VAE was made by another vae recipe (fingerprint {source.get('fingerprint')}, "
                          f"{source.get('steps')} steps; this run: {r.fingerprint('vae')}, {r.vae_steps} steps)",
                          "vae-from")
    vae = models.build_vae(r)
    loaded = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    vae.load_state_dict(loaded.state_dict())
    meta = {**source, "scaling_factor": float(loaded.config.scaling_factor), "imported_from": str(model_dir)}
    write_artefact(run.artefact("vae"), prefixed("vae", vae), meta)
    return meta


@torch.no_grad()
def latent_scale(vae, seed: int, count: int) -> float:
    """1 / std of the latents (posterior means) of `count` held-out scenes, like SD's scaling_factor."""
    batch = scenes(seed + VAE_SCENE_OFFSET, count, start=10_000_000)
    z = vae.encode(to_pixels([s.render() for s in batch])).latent_dist.mean
    return float(1.0 / z.std())


# ---- stage 2: text-encoder warm-up ------------------------------------------------------------------------
def train_text(run: Run, table: CaptionTable) -> dict:
    """From each object's kind-word hidden state, linear probes predict its named colour (or
    "unnamed") and its pattern: the causal encoder learns to carry attributes on the kind word."""
    r = run.recipe
    tokenizer = models.build_tokenizer()
    te = models.build_text_encoder(r, tokenizer).train()
    torch.manual_seed(r.seed + 3)
    probes = torch.nn.ModuleDict({"colour": torch.nn.Linear(r.text_width, len(COLOUR_LIST) + 1),
                                  "pattern": torch.nn.Linear(r.text_width, len(PATTERNS))})
    if r.name_second:                  # world v2: the kind word also carries the named second colour
        probes["second"] = torch.nn.Linear(r.text_width, len(COLOUR_LIST) + 1)
    optimizer = torch.optim.AdamW(list(te.parameters()) + list(probes.parameters()), lr=r.text_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(r.seed + 202)

    def step(i: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(i, r.text_lr, r.warmup_steps)
        idx = torch.randint(0, len(table), (r.text_batch,), generator=generator)
        hidden = te(table.token_ids[idx])[0]                                       # (B, 77, W)
        pos = table.positions[idx]                                                 # (B, 4)
        valid = pos > 0
        words = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))[valid]   # (n, W)
        colour = table.colour[idx][valid]
        colour = torch.where(colour < 0, len(COLOUR_LIST), colour)
        c_loss = F.cross_entropy(probes["colour"](words), colour)
        p_loss = F.cross_entropy(probes["pattern"](words), table.pattern[idx][valid])
        loss = c_loss + p_loss
        losses = {"colour_ce": float(c_loss.detach()), "pattern_ce": float(p_loss.detach())}
        if "second" in probes:
            second = table.second[idx][valid]
            s_loss = F.cross_entropy(probes["second"](words), torch.where(second < 0, len(COLOUR_LIST), second))
            loss = loss + s_loss
            losses["second_ce"] = float(s_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(te.parameters(), r.grad_clip)
        optimizer.step()
        return losses

    info = _stage_loop(run, "text", {"text": te, "probes": probes}, optimizer, generator, step)
    return _finish(run, "text", prefixed("text", te), info)


# ---- stage 3: text encoder + UNet -------------------------------------------------------------------------
def train_unet(run: Run, table: CaptionTable) -> dict:
    """Denoising (v-prediction or epsilon) on cached latents + token grounding; EMA of both networks."""
    r = run.recipe
    tokenizer = models.build_tokenizer()
    vae_weights, vae_meta = run.require("vae")
    text_weights, _ = run.require("text")
    scale = vae_meta["scaling_factor"]
    mean, std = dataset_latents(run, vae_weights, vae_meta)
    te = models.build_text_encoder(r, tokenizer)
    te.load_state_dict(unprefixed("text", text_weights))
    unet = models.build_unet(r)
    te.train()
    unet.train()
    recorder = RecordingAttnProcessor(levels=r.grounding_levels())
    unet.set_attn_processor(recorder)
    guided_from = r.guided_start("unet")
    coefficients = guided_coefficients()
    shapes = level_shapes(r.latent_size, r.latent_size, len(r.unet_channels))
    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": r.unet_lr, "peak": r.unet_lr},
                                   {"params": list(te.parameters()), "lr": r.text_lr_joint, "peak": r.text_lr_joint}],
                                  weight_decay=1e-2)
    generator = torch.Generator().manual_seed(r.seed + 303)
    empty = empty_caption_ids(tokenizer)
    alphas = alphas_cumprod()
    modules = {"unet": unet, "text": te}
    live = {f"{p}.{k}": v for p, m in modules.items() for k, v in m.named_parameters()}
    ema = {k: v.detach().clone() for k, v in live.items()}

    def step(i: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(i, g["peak"], r.warmup_steps, r.unet_steps, r.unet_cooldown)
        idx = torch.randint(0, len(table), (r.unet_batch,), generator=generator)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        ids = table.token_ids[idx].clone()
        dropped = torch.rand(r.unet_batch, generator=generator) < r.caption_dropout
        ids[dropped] = empty
        positions = table.positions[idx]
        valid = (positions > 0) & ~dropped[:, None]
        t = torch.randint(0, alphas.shape[0], (r.unet_batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        ac = alphas[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        target = noise if r.prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * latents
        if guided_from is not None and i >= guided_from:
            coef = coefficients[t]
            chosen = (coef > 0) & valid.any(1) & (torch.rand(r.unet_batch, generator=generator) < r.guided_fraction)
            margins = torch.randint(0, MAX_MARGIN + 1, valid.shape, generator=generator)
            maps = rectification_maps(positions, table.boxes[idx], valid, chosen, margins, IMAGE_SIZE, shapes)
            recorder.rectification = (maps, torch.where(chosen, coef, torch.zeros_like(coef)))
            valid = valid & ~chosen[:, None]          # rectified maps satisfy the grounding losses by construction
        recorder.recording = r.grounding_weight > 0 or r.pixel_weight > 0
        pred = unet(noisy, t, te(ids)[0]).sample
        recorder.recording = False
        recorder.rectification = None
        mse = F.mse_loss(pred, target)
        token, pixel = grounding_loss(recorder.take(), positions, table.boxes[idx], valid)
        loss = mse + r.grounding_weight * token + r.pixel_weight * pixel
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(live.values()), r.grad_clip)
        optimizer.step()
        with torch.no_grad():
            decay = min(r.ema_decay, (1 + i) / (10 + i))
            for k, v in live.items():
                ema[k].lerp_(v.detach(), 1 - decay)
        return {"mse": float(mse.detach()), "token": float(token.detach()), "pixel": float(pixel.detach())}

    info = _stage_loop(run, "unet", modules, optimizer, generator, step, ema=ema)
    return _finish(run, "unet", ema, info, ema_decay=r.ema_decay)


def alphas_cumprod() -> torch.Tensor:
    """(1000,) float32 alpha-bar of SD's scaled_linear betas (the schedule the engine samples with)."""
    s = models.SD_SCHEDULE
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def dataset_latents(run: Run, vae_weights: dict, vae_meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of dataset scenes 0..N-1, cached per (VAE artefact, N, seed)."""
    r = run.recipe
    name = (f"latents-{r.seed}-{r.dataset_size}{r.world_tag()}-{vae_meta['fingerprint']}-{vae_meta['steps']}"
            ".safetensors")
    path = run.out / "cache" / name
    if path.is_file():
        t = load_file(path)
        return t["mean"], t["std"]
    vae = models.build_vae(r)
    vae.load_state_dict(unprefixed("vae", vae_weights))
    vae.eval()
    mean, std = encode_latents(vae, r.seed, r.dataset_size, progress=run.progress, config=r.world())
    write_artefact(path, {"mean": mean, "std": std}, {"scenes": r.dataset_size})
    return mean, std


def captions(run: Run) -> CaptionTable:
    """The caption table of dataset scenes 0..N-1 (cached: tokenizing 40k captions takes a while)."""
    r = run.recipe
    path = run.out / "cache" / f"captions-{r.seed}-{r.dataset_size}{r.world_tag()}.safetensors"
    if path.is_file():
        return CaptionTable(**load_file(path))
    table = caption_table(models.build_tokenizer(), scenes(r.seed, r.dataset_size, config=r.world()))
    write_artefact(path, table.tensors(), {"scenes": r.dataset_size})
    return table


# ---- the model directory ------------------------------------------------------------------------------------
def export(run: Run, model_dir: Path | None = None) -> Path:
    """Write OUT/model (diffusers layout, fp16): VAE with its scaling factor, EMA text encoder and UNet."""
    for stage in STAGES:
        run.require(stage)
    final, _ = run.require("unet")
    stages = {s: read_meta(run.artefact(s)) for s in STAGES}
    return _write_model(run, final, stages, model_dir or run.out / "model")


def export_snapshot(run: Run, model_dir: Path) -> Path:
    """Write a model directory from the unet stage's latest checkpoint (its EMA weights), to measure a
    run that is still training. Its recipe.json says `"snapshot_step"`; it is never the finished model."""
    r = run.recipe
    for stage in ("vae", "text"):
        run.require(stage)
    state = load_state(run.checkpoint("unet"), "unet", r.fingerprint("unet"))
    if state["ema"] is None:
        raise Cones2Error(f"{run.checkpoint('unet')} holds no EMA weights", "out")
    stages = {s: read_meta(run.artefact(s)) for s in ("vae", "text")}
    stages["unet"] = {"fingerprint": r.fingerprint("unet"), "snapshot_step": state["step"], "steps": r.unet_steps}
    return _write_model(run, state["ema"], stages, Path(model_dir))


def _write_model(run: Run, final: dict[str, torch.Tensor], stages: dict, model_dir: Path) -> Path:
    r = run.recipe
    tokenizer = models.build_tokenizer()
    vae_weights, vae_meta = run.require("vae")
    vae = models.build_vae(r)
    vae.load_state_dict(unprefixed("vae", vae_weights))
    vae.register_to_config(scaling_factor=vae_meta["scaling_factor"])
    te = models.build_text_encoder(r, tokenizer)
    te.load_state_dict(unprefixed("text", final))
    unet = models.build_unet(r)
    unet.load_state_dict(unprefixed("unet", final))
    return models.write_model_dir(model_dir, r, vae, te, unet, tokenizer, {"stages": stages})
