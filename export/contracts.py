"""What each exported model promises: input/output names, dtypes, dynamic axes, sample inputs and
TensorRT min/opt/max profiles, one class per model (TensorRT demo/Diffusion style).

Everything here derives from `ModelFacts`, a few numbers read from the checkpoint at export time
and stored in the manifest, so a TensorRT build (or a test) needs no PyTorch model. Batch sizes in
`ShapePoint` count images; the UNet and the text encoder see two rows per image (CFG), the VAE one.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from cones2.errors import Cones2Error

SEQ_LEN = 77
SIZE_MULTIPLE = 64  # output sides the engine accepts (SamplingConfig)


@dataclass(frozen=True)
class ModelFacts:
    """The checkpoint facts the contracts need.

    in_channels: UNet latent channels. text_dim: D. vae_scale: pixels per latent (8 for SD).
    num_levels: UNet resolutions (len(block_out_channels)). attention_levels: the levels that hold
    attention layers, i.e. the weight inputs. default_resolution: training size in pixels.
    """

    in_channels: int
    text_dim: int
    vae_scale: int
    num_levels: int
    attention_levels: tuple[int, ...]
    default_resolution: int

    @classmethod
    def from_engine(cls, engine) -> "ModelFacts":
        from .unet_wrapper import cross_attention_levels

        return cls(engine.unet.config.in_channels, engine.text_dim, engine.vae_scale,
                   len(engine.unet.config.block_out_channels), tuple(cross_attention_levels(engine.unet)),
                   engine.default_resolution)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelFacts":
        return cls(**{**data, "attention_levels": tuple(data["attention_levels"])})

    def to_dict(self) -> dict:
        return {**asdict(self), "attention_levels": list(self.attention_levels)}

    @property
    def size_unit(self) -> int:
        """Output sides must be multiples of this: 64, and enough for every UNet level to halve."""
        unit = self.vae_scale * 2 ** (self.num_levels - 1)
        return SIZE_MULTIPLE * math.ceil(unit / SIZE_MULTIPLE)

    def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(h, w) of level 0..num_levels-1 for an output of height x width pixels (Engine.level_shapes)."""
        h, w = height // self.vae_scale, width // self.vae_scale
        shapes = []
        for _ in range(self.num_levels):
            shapes.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return shapes


@dataclass(frozen=True)
class ShapePoint:
    """One corner of a profile: `images` per call and the output size in pixels."""

    images: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str, field: str) -> "ShapePoint":
        """'IMAGESxHEIGHTxWIDTH' (e.g. 1x768x768) or 'IMAGESxSIZE'."""
        m = re.fullmatch(r"\s*(\d+)x(\d+)(?:x(\d+))?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise Cones2Error(f"expected IMAGESxHEIGHTxWIDTH such as 1x768x768, got {text!r}", field)
        images, height = int(m.group(1)), int(m.group(2))
        return cls(images, height, int(m.group(3)) if m.group(3) else height)

    def __str__(self) -> str:
        return f"{self.images}x{self.height}x{self.width}"


Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str          # "float32", "float16", "int64"
    axes: tuple         # each an int (static) or a str (dynamic axis name)


class Contract:
    """Base: subclasses set `name`, `filename` and implement `inputs`, `outputs`, `shapes`."""

    name = ""
    filename = ""
    rows_per_image = 1

    def __init__(self, facts: ModelFacts, dtype: str = "float32"):
        self.facts, self.dtype = facts, dtype

    # ---- to be provided -------------------------------------------------------------------------
    def inputs(self, static: tuple[int, int] | None = None) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self, static: tuple[int, int] | None = None) -> list[TensorSpec]:
        raise NotImplementedError

    def shapes(self, batch: int, height: int, width: int) -> dict[str, Shape]:
        """Concrete shape of every input for a batch of `batch` rows at height x width pixels."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    def dynamic_axes(self, static: tuple[int, int] | None = None) -> dict[str, dict[int, str]]:
        """Input name -> {axis: name} for every dynamic axis (torch.onnx.export's `dynamic_axes`)."""
        return {t.name: {i: a for i, a in enumerate(t.axes) if isinstance(a, str)}
                for t in self.inputs(static) if any(isinstance(a, str) for a in t.axes)}

    def point_shapes(self, point: ShapePoint) -> dict[str, Shape]:
        return self.shapes(point.images * self.rows_per_image, point.height, point.width)

    def profile(self, low: ShapePoint, opt: ShapePoint, high: ShapePoint) -> dict[str, tuple[Shape, Shape, Shape]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        a, b, c = self.point_shapes(low), self.point_shapes(opt), self.point_shapes(high)
        return {name: (a[name], b[name], c[name]) for name in a}

    def sample_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs of the contract's shapes and dtypes (CPU), for export tracing and checks."""
        gen = torch.Generator().manual_seed(seed)
        shapes, out = self.shapes(batch, height, width), {}
        for spec in self.inputs():
            if spec.dtype == "int64":
                out[spec.name] = torch.randint(0, 1000, shapes[spec.name], generator=gen)
            else:
                out[spec.name] = torch.randn(shapes[spec.name], generator=gen).to(getattr(torch, spec.dtype))
        return out

    def describe(self, static: tuple[int, int] | None = None) -> dict:
        """The manifest entry: file, inputs and outputs with dtypes and (symbolic) shapes."""
        specs = lambda ts: [{"name": t.name, "dtype": t.dtype, "shape": list(t.axes)} for t in ts]  # noqa: E731
        return {"file": self.filename, "inputs": specs(self.inputs(static)), "outputs": specs(self.outputs(static)),
                "rows_per_image": self.rows_per_image}


def _hw(static, prefix: str = "") -> tuple:
    return tuple(static) if static else (f"{prefix}height", f"{prefix}width")


class UNetContract(Contract):
    """sample (B, C, h, w), timestep (B,) fp32, encoder_hidden_states (B, 77, D), coef (B,) fp32,
    weight_<l> (B, N_l, 77) fp32 per attention level -> prediction (B, C, h, w).

    B = 2 rows per image: the conditional and unconditional CFG branches in one call. Each level's
    N_l = h_l * w_l is its own dynamic axis (n<l>), so the graph needs no resampling of the layout.
    """

    name, filename, rows_per_image = "unet", "unet.onnx", 2

    def weight_names(self) -> list[str]:
        return [f"weight_{level}" for level in self.facts.attention_levels]

    def _latent_static(self, static):
        if not static:
            return None
        return static[0] // self.facts.vae_scale, static[1] // self.facts.vae_scale

    def inputs(self, static=None) -> list[TensorSpec]:
        f = self.facts
        hw = self._latent_static(static)
        specs = [TensorSpec("sample", self.dtype, ("batch", f.in_channels, *_hw(hw, "latent_"))),
                 TensorSpec("timestep", "float32", ("batch",)),
                 TensorSpec("encoder_hidden_states", self.dtype, ("batch", SEQ_LEN, f.text_dim)),
                 TensorSpec("coef", "float32", ("batch",))]
        levels = f.level_shapes(*static) if static else None
        for level, name in zip(f.attention_levels, self.weight_names()):
            n = levels[level][0] * levels[level][1] if levels else f"n{level}"
            specs.append(TensorSpec(name, "float32", ("batch", n, SEQ_LEN)))
        return specs

    def outputs(self, static=None) -> list[TensorSpec]:
        return [TensorSpec("prediction", self.dtype, ("batch", self.facts.in_channels,
                                                      *_hw(self._latent_static(static), "latent_")))]

    def shapes(self, batch, height, width) -> dict[str, Shape]:
        f = self.facts
        h, w = height // f.vae_scale, width // f.vae_scale
        levels = f.level_shapes(height, width)
        out = {"sample": (batch, f.in_channels, h, w), "timestep": (batch,),
               "encoder_hidden_states": (batch, SEQ_LEN, f.text_dim), "coef": (batch,)}
        for level, name in zip(f.attention_levels, self.weight_names()):
            out[name] = (batch, levels[level][0] * levels[level][1], SEQ_LEN)
        return out

    def sample_inputs(self, batch, height, width, seed=0) -> dict[str, torch.Tensor]:
        """Plausible inputs: timesteps in [0, 1000), first half guided (coef > 0), layout-like weights
        with hard masks (-1e8), subject strengths (2.5) and untouched tokens (0)."""
        out = super().sample_inputs(batch, height, width, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        out["timestep"] = torch.rand(batch, generator=gen) * 999
        out["coef"] = torch.where(torch.arange(batch) < (batch + 1) // 2, 0.3, 0.0)
        for name in self.weight_names():
            b, n, m = out[name].shape
            inside = torch.rand(b, n, 1, generator=gen) < 0.5
            tokens = torch.zeros(1, 1, m)
            tokens[..., 2:4] = 1.0
            out[name] = torch.where(inside, 2.5, -1e8) * tokens
        return out


class TextEncoderContract(Contract):
    """input_ids (B, 77) int64 -> last_hidden_state (B, 77, D): E(p) after the final layer norm."""

    name, filename, rows_per_image = "text_encoder", "text_encoder.onnx", 2

    def inputs(self, static=None):
        return [TensorSpec("input_ids", "int64", ("batch", SEQ_LEN))]

    def outputs(self, static=None):
        return [TensorSpec("last_hidden_state", self.dtype, ("batch", SEQ_LEN, self.facts.text_dim))]

    def shapes(self, batch, height, width):
        return {"input_ids": (batch, SEQ_LEN)}


class VaeDecoderContract(Contract):
    """latent (B, C, h, w), the sampler's final latents -> images (B, 3, H, W) in [-1, 1]."""

    name, filename, rows_per_image = "vae_decoder", "vae_decoder.onnx", 1

    def inputs(self, static=None):
        hw = (static[0] // self.facts.vae_scale, static[1] // self.facts.vae_scale) if static else None
        return [TensorSpec("latent", self.dtype, ("batch", self.facts.in_channels, *_hw(hw, "latent_")))]

    def outputs(self, static=None):
        return [TensorSpec("images", self.dtype, ("batch", 3, *_hw(static)))]

    def shapes(self, batch, height, width):
        f = self.facts
        return {"latent": (batch, f.in_channels, height // f.vae_scale, width // f.vae_scale)}


CONTRACTS = (UNetContract, TextEncoderContract, VaeDecoderContract)


def contracts(facts: ModelFacts, dtype: str = "float32") -> dict[str, Contract]:
    """Every exported model's contract, by name."""
    return {c.name: c(facts, dtype) for c in CONTRACTS}


def default_profile(facts: ModelFacts, static: tuple[int, int] | None = None) -> tuple[ShapePoint, ShapePoint, ShapePoint]:
    """min/opt/max when the user gives none: 1 image at half the training size .. 4 images at 1.5x
    (sides rounded to the size unit); a static export fixes the sides."""
    if static:
        h, w = static
        return ShapePoint(1, h, w), ShapePoint(1, h, w), ShapePoint(4, h, w)
    unit, d = facts.size_unit, facts.default_resolution
    side = lambda x: max(unit, unit * round(x / unit))  # noqa: E731
    return ShapePoint(1, side(d / 2), side(d / 2)), ShapePoint(1, side(d), side(d)), ShapePoint(4, side(d * 1.5), side(d * 1.5))


def check_profile(facts: ModelFacts, low: ShapePoint, opt: ShapePoint, high: ShapePoint,
                  static: tuple[int, int] | None = None) -> None:
    """Cones2Error naming the flag when a profile corner is illegal or out of order."""
    for flag, p in (("min", low), ("opt", opt), ("max", high)):
        if p.images < 1:
            raise Cones2Error(f"needs at least 1 image, got {p}", flag)
        for side in (p.height, p.width):
            if side < facts.size_unit or side % facts.size_unit:
                raise Cones2Error(f"sides must be positive multiples of {facts.size_unit} px, got {p}", flag)
        if static and (p.height, p.width) != tuple(static):
            raise Cones2Error(f"the ONNX export has the static shape {static[0]}x{static[1]}, got {p}", flag)
    for attr in ("images", "height", "width"):
        if not getattr(low, attr) <= getattr(opt, attr) <= getattr(high, attr):
            raise Cones2Error(f"need min <= opt <= max in {attr}, got {low}, {opt}, {high}", "opt")
