"""`cones2-engine generate`: prompt + residuals + layout -> PNG (flags or a reference JSON config).

Everything that can be checked without the model (flags, residual files, layout, output paths,
device, dtype, backend) is checked before it loads, so a bad value answers in well under a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING

from .. import limits
from ..atomic import atomic_write
from ..config import SamplingConfig
from ..errors import Cones2Error
from ..limits import positions as check_positions
from ..outputs import output_file
from ..threads import configure_threads
from .common import add_model_flags, add_threads_flag, check_model_flags, key_value, load_engine, numbers

if TYPE_CHECKING:
    from ..engine import GenerationRequest

PLACEHOLDER_SIDE = 64   # stands in for a side the model decides, while the other settings are checked


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an image", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    add_threads_flag(p)
    p.add_argument("--config", help="reference-implementation inference config (JSON); flags override it")
    p.add_argument("--prompt")
    p.add_argument("--subject", action="append", default=[], metavar="NAME=RESIDUAL",
                   help="residual file for a word of the prompt (.safetensors or reference .pt); repeatable")
    p.add_argument("--position", action="append", default=[], metavar="NAME=IDX[,IDX]",
                   help="explicit token position(s) for a subject's residual (token 0 = start token)")
    p.add_argument("--box", action="append", default=[], metavar="NAME=x0,y0,x1,y1",
                   help="layout box for a subject, normalised to [0, 1] (or pixels with --box-units pixels)")
    p.add_argument("--box-units", choices=["normalized", "pixels"], default="normalized")
    p.add_argument("--strength", action="append", default=[], metavar="NAME=W",
                   help="layout strength w+ for a subject, in [0, 1e4] (default 2.5)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--steps", type=int, default=None, help="default: 50 in paper-exact mode, 20 in fast mode; at most 1000")
    p.add_argument("--guidance-steps", type=int, default=None,
                   help="default: all steps in paper-exact mode, the first 33%% in fast mode")
    p.add_argument("--guidance-weight", type=float, default=None, help="in [0, 10], default 0.08")
    p.add_argument("--cfg", type=float, default=None, help="in [0, 100], default 7.5")
    p.add_argument("--negative-weight", type=float, default=None, help="in [-1e9, 0], default -1e8")
    p.add_argument("--resolution", type=int, help="square output size (multiple of 64)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--mode", choices=["paper-exact", "fast"], default="paper-exact",
                   help="paper-exact: SPEC 4's Euler sampler; fast: DPM-Solver++ 2M (docs/speed.md)")
    p.add_argument("--layout-resize", choices=limits.LAYOUT_RESIZES, default=limits.LAYOUT_RESIZES[0],
                   help="how the layout reaches each attention level: aligned-corners (SPEC 3) or cell-centres "
                        "(for subjects a few latent cells wide; docs/layout.md)")
    p.add_argument("--out", default="out.png", help="PNG to write")
    p.add_argument("--save-latents", metavar="FILE.safetensors", help="also write final latents and cond embeddings")
    p.add_argument("--preview", action="store_true", help="also write OUT.preview.png with the layout drawn over it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    _check_flag_values(args)                 # before torch is even imported: answers in a fraction of a second
    configure_threads(args.threads)
    request, sides = _request(args)          # every flag and user file
    outputs = _outputs(args, request)        # where it writes: checked before any work, nothing written yet
    model_flags = check_model_flags(args)    # device, dtype, backend: all before the model loads
    engine = load_engine(args, model_flags)
    if None in sides:                        # a side left to the model: its training resolution
        size = engine.default_resolution
        config = dataclasses.replace(request.config, height=sides[0] or size, width=sides[1] or size)
        request = dataclasses.replace(request, config=config)
    [result] = engine.generate_batch([request], progress=not args.no_progress)

    atomic_write(outputs["out"], result.png())
    written = [str(outputs["out"])]
    if "preview" in outputs:
        from ..image import draw_layout

        masks = request.layout.masks(result.image.height, result.image.width)
        atomic_write(outputs["preview"], _png_bytes(draw_layout(result.image, masks)))
        written.append(str(outputs["preview"]))
    if "latents" in outputs:
        from safetensors.torch import save

        params = result.parameters()
        tensors = {"latents": result.latents.contiguous(), "cond_embeddings": result.cond_embeddings.contiguous()}
        atomic_write(outputs["latents"], save(tensors, metadata={k: str(v) for k, v in params.items()}))
        written.append(str(outputs["latents"]))
    t = result.timings
    print(f"wrote {', '.join(written)}  ({t['total']:.2f}s: sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s)")
    return 0


def _outputs(args, request: GenerationRequest) -> dict[str, Path]:
    """Every file this run writes, checked writable (suffix, not a folder, a folder that takes files)."""
    out = output_file(args.out, "out", (".png",))
    outputs = {"out": out}
    if args.preview and request.layout is not None:
        outputs["preview"] = output_file(out.with_suffix(".preview.png"), "preview", (".png",))
    if args.save_latents:
        outputs["latents"] = output_file(args.save_latents, "save-latents", (".safetensors",))
    return outputs


def _flag_settings(args) -> dict:
    """SamplingConfig fields given as flags."""
    flags = (("seed", "seed"), ("steps", "steps"), ("guidance_steps", "guidance_steps"),
             ("guidance_weight", "guidance_weight"), ("cfg", "cfg_scale"), ("negative_weight", "negative_weight"),
             ("layout_resize", "layout_resize"))
    return {key: getattr(args, flag) for flag, key in flags if getattr(args, flag) is not None}


def _sides(args) -> tuple[int | None, int | None]:
    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise Cones2Error("give --resolution or --height/--width, not both", "--resolution")
    return tuple(args.resolution if side is None else side for side in (args.height, args.width))


def _check_flag_values(args) -> None:
    """The flags that need no file, no model and no torch: sampling settings, strengths, output paths.
    `_request` checks them again with everything else; this only makes a bad value answer fast."""
    sides = _sides(args)
    SamplingConfig(height=PLACEHOLDER_SIDE if sides[0] is None else sides[0],
                   width=PLACEHOLDER_SIDE if sides[1] is None else sides[1], mode=args.mode, **_flag_settings(args))
    for item in args.strength:
        name, value = key_value(item, "--strength")
        limits.number(numbers(value, f"--strength {name}", 1)[0], f"layout.strengths.{name}", limits.STRENGTH)
    output_file(args.out, "out", (".png",))
    if args.save_latents:
        output_file(args.save_latents, "save-latents", (".safetensors",))


def _request(args) -> tuple[GenerationRequest, tuple[int | None, int | None]]:
    """The validated request (a placeholder stands in for sides the model decides) and the sides given."""
    from ..engine import GenerationRequest
    from ..layout import Layout
    from ..residual import Residual

    prompt, subjects, positions, layout, settings = None, {}, None, None, {}
    if args.config:
        from .reference_config import load_reference_config

        cfg = load_reference_config(args.config)
        prompt, subjects, positions, layout, settings = cfg.prompt, cfg.subjects, cfg.positions, cfg.layout, cfg.settings
    prompt = args.prompt or prompt
    if not prompt:
        raise Cones2Error("give --prompt or --config", "prompt")
    for item in args.subject:
        name, path = key_value(item, "--subject")
        subjects[name] = Residual.load(path, f"--subject {name}")
    for item in args.position:
        name, idx = key_value(item, "--position")
        positions = dict(positions or {})
        positions[name] = check_positions(numbers(idx, f"--position {name}"), f"--position {name}")
    if args.box:
        boxes = dict(key_value(b, "--box") for b in args.box)
        strengths = {n: numbers(v, f"--strength {n}", 1)[0] for n, v in (key_value(s, "--strength") for s in args.strength)}
        layout = Layout.from_boxes({n: numbers(v, f"--box {n}", 4) for n, v in boxes.items()}, strengths,
                                   units=args.box_units)
    elif args.strength:
        raise Cones2Error("--strength needs --box", "--strength")
    settings.update(_flag_settings(args))
    sides = _sides(args)
    config = SamplingConfig(height=PLACEHOLDER_SIDE if sides[0] is None else sides[0],
                            width=PLACEHOLDER_SIDE if sides[1] is None else sides[1], mode=args.mode, **settings)
    if layout is not None and None not in sides:
        layout.masks(config.height, config.width)      # a region that vanishes at this size
    return GenerationRequest(prompt, subjects, layout, config, positions), sides


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
