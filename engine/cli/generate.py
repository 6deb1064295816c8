"""`cones2-engine generate`: prompt + residuals + layout -> PNG (flags or a reference JSON config)."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import Cones2Error
from ..layout import Layout
from ..residual import Residual
from .common import add_model_flags, key_value, load_engine, numbers


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an image", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
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
                   help="layout strength w+ for a subject (default 2.5)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--steps", type=int, default=None, help="default 50")
    p.add_argument("--guidance-steps", type=int, default=None, help="default: all steps")
    p.add_argument("--guidance-weight", type=float, default=None, help="default 0.08")
    p.add_argument("--cfg", type=float, default=None, help="default 7.5")
    p.add_argument("--negative-weight", type=float, default=None, help="default -1e8")
    p.add_argument("--resolution", type=int, help="square output size (multiple of 64)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--mode", choices=["paper-exact", "fast"], default="paper-exact")
    p.add_argument("--out", default="out.png", help="PNG to write")
    p.add_argument("--save-latents", metavar="FILE.safetensors", help="also write final latents and cond embeddings")
    p.add_argument("--preview", action="store_true", help="also write OUT.preview.png with the layout drawn over it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    inputs = _inputs(args)            # every user file and flag is checked before the model loads
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise Cones2Error(f"must end in .png, got {out}", "out")
    engine = load_engine(args)
    size = args.resolution
    result = engine.generate(inputs["prompt"], inputs["subjects"], inputs["layout"],
                             subject_positions=inputs["positions"],
                             height=args.height or size, width=args.width or size, mode=args.mode,
                             progress=not args.no_progress, **inputs["settings"])
    from ..image import draw_layout, png_info

    params = result.parameters() | {"model": engine.components.model_id, "backend": args.backend or engine.default_backend}
    _atomic_write(out, lambda f: result.image.save(f, format="PNG", pnginfo=png_info(params)))
    written = [str(out)]
    if args.preview and inputs["layout"] is not None:
        preview = out.with_suffix(".preview.png")
        masks = inputs["layout"].masks(result.image.height, result.image.width)
        _atomic_write(preview, lambda f: draw_layout(result.image, masks).save(f, format="PNG"))
        written.append(str(preview))
    if args.save_latents:
        from safetensors.torch import save

        tensors = {"latents": result.latents.contiguous(), "cond_embeddings": result.cond_embeddings.contiguous()}
        _atomic_write(Path(args.save_latents), lambda f: f.write(save(tensors, metadata={k: str(v) for k, v in params.items()})))
        written.append(args.save_latents)
    t = result.timings
    print(f"wrote {', '.join(written)}  ({t['total']:.2f}s: sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s)")
    return 0


def _inputs(args) -> dict:
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
        positions[name] = [int(v) for v in numbers(idx, f"--position {name}") if v == int(v)]
    if args.box:
        boxes = dict(key_value(b, "--box") for b in args.box)
        strengths = {n: numbers(v, f"--strength {n}", 1)[0] for n, v in (key_value(s, "--strength") for s in args.strength)}
        layout = Layout.from_boxes({n: numbers(v, f"--box {n}", 4) for n, v in boxes.items()}, strengths,
                                   units=args.box_units)
    elif args.strength:
        raise Cones2Error("--strength needs --box", "--strength")
    for flag, key in (("seed", "seed"), ("steps", "steps"), ("guidance_steps", "guidance_steps"),
                      ("guidance_weight", "guidance_weight"), ("cfg", "cfg_scale"), ("negative_weight", "negative_weight")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.resolution and (args.height or args.width):
        raise Cones2Error("give --resolution or --height/--width, not both", "--resolution")
    return {"prompt": prompt, "subjects": subjects, "positions": positions, "layout": layout, "settings": settings}


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder and rename: an error never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
