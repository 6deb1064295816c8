"""The demo model's recipe: architecture and training settings in one frozen dataclass (issue 7).

`Recipe()` is the recipe that produces the shipped weights; `Recipe.smoke()` is a few-step version
for tests. Everything that changes the weights is in here, so `fingerprint()` (stored with every
checkpoint) refuses to resume a run under different settings.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from cones2 import Cones2Error

from .world import IMAGE_SIZE, WorldConfig

STAGES = ("vae", "text", "unet")
DEMO_VERSION = "demo-world-v1"


@dataclass(frozen=True)
class Recipe:
    """Settings of a demo-model training run.

    Architecture: `vae_channels` (one VAE block per entry: 4 blocks take 64 px to 8x8 latents, 3
    blocks to 16x16, `latent_size`), `latent_channels`; `text_width`, `text_layers`, `text_heads` of
    the CLIP text encoder (full 49408-token CLIP vocabulary); `unet_channels` (3 levels: the latent
    size and its half with cross-attention, its quarter without; the mid block has it), `unet_heads`
    (attention heads per level).

    Stages, each with steps, batch size and peak learning rate: vae (reconstruction L1 on
    object-weighted pixels + KL; the latent scaling factor is measured on `scale_samples` held-out
    scenes); text (a warm-up that teaches the causal encoder to carry each object's colour and
    pattern on its kind word); unet (text encoder + UNet jointly: v-prediction loss +
    `grounding_weight` * token loss + `pixel_weight` * pixel loss on the kind words'
    cross-attention at the two cross-attention levels, see grounding.py). `dataset_size` scenes are rendered and
    encoded once for the unet stage; `caption_dropout` of their captions are replaced by "" (for
    classifier-free guidance).

    World (text and unet stages; the VAE always learns on the default world): `p_pattern`, the
    share of striped / two-tone objects, and `name_second`, whether captions name a patterned
    object's second colour (world v2; the text stage then also probes the second colour). At their
    v1 defaults they are left out of the fingerprints, so v1 checkpoints stay valid.

    Learning rates warm up linearly over `warmup_steps`, then stay constant, so a finished run can be
    extended; `unet_cooldown` > 0 makes the unet stage's rates fall linearly to 0 over its last
    `unet_cooldown` steps (warm-up, stable, decay), so a constant-rate run can be extended and then
    cooled down. `unet_guided_tail` > 0 trains a `guided_fraction` of the samples at guided timesteps
    of the unet stage's last `unet_guided_tail` steps under layout guidance (`guided_training`). Like
    the step counts, neither is in the fingerprint; checkpoints and artefacts record them.
    """

    seed: int = 0
    # architecture
    vae_channels: tuple[int, ...] = (16, 32, 32, 64)
    latent_channels: int = 4
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, int, int] = (64, 128, 128)
    unet_heads: tuple[int, int, int] = (2, 4, 4)
    prediction_type: str = "v_prediction"
    # vae stage
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 4.0
    scale_samples: int = 512
    # text stage
    text_steps: int = 300
    text_batch: int = 128
    text_lr: float = 2e-3
    # unet stage
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_lr_joint: float = 2e-4
    grounding_weight: float = 0.5
    pixel_weight: float = 0.5
    caption_dropout: float = 0.1
    dataset_size: int = 40_000
    ema_decay: float = 0.999
    unet_cooldown: int = 0
    unet_guided_tail: int = 0
    guided_fraction: float = 0.5
    warmup_steps: int = 200
    grad_clip: float = 1.0
    # world (text + unet stages)
    p_pattern: float = 0.2
    name_second: bool = False

    def __post_init__(self):
        for name in ("vae_steps", "text_steps", "unet_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise Cones2Error(f"must be an integer >= 0, got {getattr(self, name)!r}", name)
        if not isinstance(self.unet_cooldown, int) or not 0 <= self.unet_cooldown <= self.unet_steps:
            raise Cones2Error(f"must be an integer in [0, unet_steps={self.unet_steps}], got {self.unet_cooldown!r}",
                              "unet_cooldown")
        if not isinstance(self.unet_guided_tail, int) or not 0 <= self.unet_guided_tail <= self.unet_steps:
            raise Cones2Error(f"must be an integer in [0, unet_steps={self.unet_steps}], got {self.unet_guided_tail!r}",
                              "unet_guided_tail")
        if not 0 < self.guided_fraction <= 1:
            raise Cones2Error(f"must be in (0, 1], got {self.guided_fraction!r}", "guided_fraction")
        for name in ("vae_batch", "text_batch", "unet_batch", "dataset_size", "scale_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise Cones2Error(f"must be an integer >= 1, got {getattr(self, name)!r}", name)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise Cones2Error(f"must be epsilon or v_prediction, got {self.prediction_type!r}", "prediction_type")
        if not 0 <= self.caption_dropout < 1:
            raise Cones2Error(f"must be in [0, 1), got {self.caption_dropout}", "caption_dropout")
        if not 0 <= self.p_pattern <= 1:
            raise Cones2Error(f"must be in [0, 1], got {self.p_pattern}", "p_pattern")
        if len(self.vae_channels) not in (3, 4):
            raise Cones2Error(f"must have 3 or 4 blocks (16x16 or 8x8 latents), got {self.vae_channels}",
                              "vae_channels")

    @property
    def latent_size(self) -> int:
        """Latent side for the world's 64 px images: each VAE block after the first halves it."""
        return IMAGE_SIZE // 2 ** (len(self.vae_channels) - 1)

    def grounding_levels(self) -> tuple[int, int]:
        """Query counts (h * w) of the two cross-attention levels the grounding losses act on."""
        side = self.latent_size
        return side * side, (side // 2) ** 2

    @classmethod
    def v2(cls, **overrides) -> "Recipe":
        """World v2 (issue 14): 40 % patterned objects whose captions name both colours."""
        return cls(**{**WORLD_V2, **overrides})

    @property
    def demo_version(self) -> str:
        """The model_index.json marker: demo-world-v1, or -v2 for the world that names both colours."""
        return "demo-world-v2" if self.name_second else DEMO_VERSION

    def world(self) -> WorldConfig:
        """The world the text and unet stages learn from."""
        return WorldConfig(p_pattern=self.p_pattern, name_second=self.name_second)

    def world_tag(self) -> str:
        """"" for the v1 world, else a short tag for cache file names."""
        if all(getattr(self, k) == v for k, v in WORLD_DEFAULTS.items()):
            return ""
        return f"-p{self.p_pattern:g}" + ("-named2" if self.name_second else "")

    @classmethod
    def smoke(cls, **overrides) -> "Recipe":
        """A few steps of everything on small batches: for tests, not for pictures."""
        base = dict(vae_steps=3, vae_batch=4, text_steps=3, text_batch=8, unet_steps=3, unet_batch=4,
                    dataset_size=16, scale_samples=16, warmup_steps=1, vae_channels=(8, 8, 8, 8),
                    unet_channels=(32, 32, 32),
                    text_width=32, text_layers=1, text_heads=2)
        return cls(**{**base, **overrides})

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def cooldown(self, stage: str) -> int:
        """Steps at the end of `stage` over which its learning rates decay to 0 (0: none)."""
        return getattr(self, f"{stage}_cooldown", 0)

    def decay_start(self, stage: str) -> int | None:
        """The step where `stage`'s learning rates start to fall (None: no cooldown)."""
        return self.steps(stage) - self.cooldown(stage) if self.cooldown(stage) else None

    def guided_start(self, stage: str) -> int | None:
        """The step where `stage` starts to train samples under layout guidance (None: never)."""
        tail = getattr(self, f"{stage}_guided_tail", 0)
        return self.steps(stage) - tail if tail else None

    def tail_phases(self, stage: str) -> dict:
        """What changes over `stage`'s last steps, as checkpoints and artefacts record it: where the
        learning-rate decay starts, where guided training starts and its sample share."""
        guided = self.guided_start(stage)
        return {"decay_start": self.decay_start(stage), "guided_start": guided,
                "guided_fraction": self.guided_fraction if guided is not None else None}

    def with_steps(self, **steps: int) -> "Recipe":
        """A copy with other step counts ({'vae': 10, ...})."""
        return replace(self, **{f"{k}_steps": v for k, v in steps.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, stage: str) -> str:
        """Hash of every setting that shapes `stage`'s weights: the common ones, those of the earlier
        stages, and this stage's own except its step count (so a finished run can be extended)."""
        d = self.to_dict()
        keys = set(COMMON_KEYS)
        for s in STAGES[: STAGES.index(stage) + 1]:
            keys |= set(STAGE_KEYS[s])
        keys.discard(f"{stage}_steps")
        keys -= {k for k, v in WORLD_DEFAULTS.items() if d[k] == v}      # v1 fingerprints stay as they were
        return hashlib.sha256(json.dumps({k: d[k] for k in sorted(keys)}).encode()).hexdigest()[:16]


def recipe_for(world: str = "v1", latent: int = 8, seed: int = 0, smoke: bool = False) -> Recipe:
    """The recipe the command lines name: --world v1|v2, --latent 8|16, --seed, --smoke (train and
    snapshot build it alike, so a snapshot reads the checkpoints of the run it names)."""
    settings: dict = dict(WORLD_V2) if world == "v2" else {}
    if latent == 16:
        settings["vae_channels"] = (8, 8, 8) if smoke else LATENT_16["vae_channels"]
    elif latent != 8:
        raise Cones2Error(f"must be 8 or 16, got {latent!r}", "latent")
    return Recipe.smoke(seed=seed, **settings) if smoke else Recipe(seed=seed, **settings)


COMMON_KEYS = ("seed", "vae_channels", "latent_channels", "text_width", "text_layers", "text_heads", "unet_channels",
               "unet_heads", "prediction_type", "warmup_steps", "grad_clip")
STAGE_KEYS = {
    "vae": ("vae_steps", "vae_batch", "vae_lr", "vae_kl_weight", "vae_object_weight", "scale_samples"),
    "text": ("text_steps", "text_batch", "text_lr", "p_pattern", "name_second"),
    "unet": ("unet_steps", "unet_batch", "unet_lr", "text_lr_joint", "grounding_weight", "pixel_weight",
             "caption_dropout", "dataset_size", "ema_decay"),
}
WORLD_DEFAULTS = {"p_pattern": 0.2, "name_second": False}     # world v1
WORLD_V2 = {"p_pattern": 0.4, "name_second": True}
LATENT_16 = {"vae_channels": (16, 32, 64)}      # 64 px -> 16x16 latents (issue 14: finer masks and details)
