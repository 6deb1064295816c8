"""`cones2-engine generate`: prompt + residuals + layout -> PNG (flags, a reference JSON config, or an
earlier image's own metadata with --from-png; flags override both).

Everything that can be checked without the model (flags, residual files, layout, output paths,
device, dtype, backend) is checked before it loads, so a bad value answers in well under a second.
Several seeds (`--seed 1,2,5`, `--seed 10-13`, `--num-images N`) run through `Engine.generate_batch`.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import limits
from ..atomic import atomic_write
from ..config import SamplingConfig
from ..errors import Cones2Error, quote
from ..limits import positions as check_positions
from ..modes import DEFAULT_MODE, guidance_steps_help, steps_help
from ..names import did_you_mean, prompt_words
from ..outputs import output_file
from ..threads import configure_threads
from .common import add_mode_flag, add_model_flags, add_threads_flag, check_model_flags, escape, key_value, load_engine, numbers
from .feedback import Stopwatch, elapsed_bar, stage_times
from .seeds import add_seed_flags, choose_seeds, per_seed

if TYPE_CHECKING:
    from ..engine import GenerationRequest

PLACEHOLDER_SIDE = 64   # stands in for a side the model decides, while the other settings are checked
BATCH = 4               # images per sampling loop with several seeds


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an image", description=__doc__)
    add_model_flags(p)
    add_threads_flag(p)
    p.add_argument("--model-config", metavar="DIR",
                   help="for a single-file --model that is not SD 1.x/2.x: a diffusers folder whose configs describe "
                        "it (default: the shipped SD 1.x/2.x configs, told apart by the text encoder's keys)")
    src = p.add_argument_group("inputs")
    src.add_argument("--config", help="reference-implementation inference config (JSON); flags override it")
    src.add_argument("--from-png", metavar="IMG", help="re-run an image this engine made, from its metadata "
                     "(prompt, settings, layout, residuals by sha256, model checked by fingerprint); flags override it")
    src.add_argument("--residual-dir", action="append", default=[], metavar="DIR",
                     help="where --from-png looks for the recorded residual files (repeatable; then the image's "
                          "folder and the model's residuals/ folder)")
    src.add_argument("--prompt", help="the text prompt; each subject word must occur in it")
    src.add_argument("--negative-prompt", metavar="TEXT",
                     help="what the unconditional branch encodes (default: empty, SPEC 2's U = E(''))")
    src.add_argument("--subject", action="append", default=[], metavar="NAME=RESIDUAL",
                     help="residual file for a word of the prompt (.safetensors or reference .pt); repeatable")
    src.add_argument("--position", action="append", default=[], metavar="NAME=IDX[,IDX]",
                     help="explicit token position(s) for a subject's residual (token 0 = start token)")
    src.add_argument("--allow-foreign-residual", action="store_true",
                     help="use residuals recorded as trained on another base model (refused otherwise)")
    lay = p.add_argument_group("layout")
    lay.add_argument("--box", action="append", default=[], metavar="NAME=x0,y0,x1,y1",
                     help="layout box for a subject, normalised to [0, 1] (or pixels with --box-units pixels)")
    lay.add_argument("--box-units", choices=["normalized", "pixels"], default=None,
                     help="units of --box (default: normalized)")
    lay.add_argument("--color-map", metavar="IMG", help="flat-colour layout image; give its colours with --color")
    lay.add_argument("--color", action="append", default=[], metavar="R,G,B=NAME[:W]",
                     help="a colour of --color-map -> subject (and strength w+); repeatable")
    lay.add_argument("--strength", action="append", default=[], metavar="NAME=W",
                     help="layout strength w+ for a boxed subject, in [0, 1e4] (default 2.5)")
    lay.add_argument("--layout-resize", choices=limits.LAYOUT_RESIZES, default=None,
                     help="how the layout reaches each attention level: aligned-corners (SPEC 3, the default) or "
                          "cell-centres (for subjects a few latent cells wide; docs/layout.md)")
    smp = p.add_argument_group("sampling")
    add_seed_flags(smp)
    smp.add_argument("--steps", type=int, help=escape(f"default: {steps_help()}; at most 1000"))
    smp.add_argument("--guidance-steps", type=int,
                     help=escape(f"steps with layout guidance, at most --steps (default: {guidance_steps_help()})"))
    smp.add_argument("--guidance-weight", type=float, help="g of SPEC 3, in [0, 10] (default 0.08)")
    smp.add_argument("--cfg", type=float, help="classifier-free guidance scale, in [0, 100] (default 7.5)")
    smp.add_argument("--negative-weight", type=float, help="w- outside each region, in [-1e9, 0] (default -1e8)")
    smp.add_argument("--gate-step", type=int, metavar="K",
                     help="fast mode: from step K on, the conditional branch alone with cached cross-attention "
                          "(default: half the steps; K = --steps turns it off; docs/speed.md)")
    smp.add_argument("--cache-interval", type=int, metavar="N",
                     help="fast mode: after the guided steps, a full UNet pass every N steps and shallow passes "
                          "on reused deep features between (default 2; 1 turns it off; docs/speed.md)")
    smp.add_argument("--resolution", type=int, help="square output side, a multiple of 64 (default: the model's)")
    smp.add_argument("--height", type=int, help="output height, a multiple of 64 (default: the model's)")
    smp.add_argument("--width", type=int, help="output width, a multiple of 64 (default: the model's)")
    add_mode_flag(smp)
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="out.png",
                     help="PNG to write (default out.png; with several seeds OUT-SEED.png)")
    out.add_argument("--save-latents", metavar="FILE.safetensors", help="also write final latents and cond embeddings")
    out.add_argument("--preview", action="store_true", help="also write OUT.preview.png with the layout drawn over it")
    out.add_argument("--dry-run", action="store_true",
                     help="check everything against the model and write OUT.preview.png (the layout on the model's "
                          "canvas, each region as the latent grid sees it) without generating")
    out.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(run=run)


@dataclasses.dataclass
class Plan:
    """One run: the request (its seed replaced per image), the sides given, the seeds, where the inputs
    came from (for --from-png's model check)."""

    request: "GenerationRequest"
    sides: tuple[int | None, int | None]
    seeds: list[int]
    recorded: object = None


def run(args) -> int:
    clock = Stopwatch()
    _check_flag_values(args)                 # before torch is even imported: answers in a fraction of a second
    configure_threads(args.threads)
    plan = _plan(args)                       # every flag and user file
    outputs = _outputs(args, plan)           # where it writes: checked before any work, nothing written yet
    if plan.recorded is not None and args.backend is None and args.onnx is None and args.trt is None:
        from .from_png import recorded_backend

        args.backend = recorded_backend(plan.recorded, args.device)   # what made the image, if it runs here
    model_flags = check_model_flags(args)    # device, dtype, backend: all before the model loads
    if args.model_config:
        model_flags["model_config"] = args.model_config
    if args.dry_run and model_flags["backend"] is None:
        model_flags["backend"] = "reference"     # builds no runner: a dry run never exports
    if args.model is None and plan.recorded is not None and plan.recorded.model_source:
        args.model = _recorded_model(plan.recorded)
    engine = _load(args, model_flags)
    if plan.recorded is not None:
        from .from_png import check_same_model

        check_same_model(plan.recorded, engine)
    requests = _requests(plan, engine)
    for request in requests:
        engine.check(request)
    if args.dry_run:
        return _dry_run(engine, requests, outputs)

    written = []
    sampling = decode = 0.0
    for start in range(0, len(requests), BATCH):
        results = engine.generate_batch(requests[start : start + BATCH], progress=not args.no_progress)
        for result in results:
            written += _write(result, outputs[result.seed])
            print(f"seed {result.seed}: {', '.join(written[-len(outputs[result.seed]):])}", flush=True)
        sampling += results[0].timings["sampling"]
        decode += results[0].timings["decode"]
    stages = {"load": engine.load_timings.get("load", 0.0), "export": engine.load_timings.get("backend", 0.0),
              "sampling": sampling, "decode": decode, "total": clock()}
    print(f"wrote {len(written)} file(s) ({stage_times(stages)}; export = starting backend "
          f"{engine.default_backend}, cached after the first run)")
    return 0


def _load(args, model_flags: dict):
    """The engine, announced with a line and timed; a bar counts the seconds while it loads."""
    name = args.model or "the default model"
    print(f"loading {name} ({model_flags['device']}, {model_flags['dtype']}) ...", flush=True)
    with elapsed_bar("loading", enabled=not args.no_progress):
        engine = load_engine(args, model_flags)
    t = engine.load_timings
    print(f"loaded {engine.components.model_id} in {sum(t.values()):.2f}s (weights {t.get('load', 0):.2f}s, "
          f"backend {engine.default_backend} {t.get('backend', 0):.2f}s)", flush=True)
    return engine


def _recorded_model(recorded) -> str:
    if not Path(recorded.model_source).exists():
        raise Cones2Error(f"the image was made with {recorded.model_name} at {recorded.model_source}, which is not "
                          "here; pass --model", "from-png")
    return recorded.model_source


def _requests(plan: Plan, engine) -> list["GenerationRequest"]:
    """One request per seed, with the sides the model decides filled in."""
    size = engine.default_resolution
    config = dataclasses.replace(plan.request.config, height=plan.sides[0] or size, width=plan.sides[1] or size)
    return [dataclasses.replace(plan.request, config=dataclasses.replace(config, seed=s)) for s in plan.seeds]


def _write(result, paths: dict[str, Path]) -> list[str]:
    """This image's files (PNG, preview, latents), each written atomically."""
    atomic_write(paths["out"], result.png())
    if "preview" in paths:
        from ..image import draw_layout

        masks = result.request.layout.masks(result.image.height, result.image.width)
        atomic_write(paths["preview"], _png_bytes(draw_layout(result.image, masks)))
    if "latents" in paths:
        from safetensors.torch import save

        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in result.parameters().items()}
        tensors = {"latents": result.latents.contiguous(), "cond_embeddings": result.cond_embeddings.contiguous()}
        atomic_write(paths["latents"], save(tensors, metadata=meta))
    return [str(p) for p in paths.values()]


def _dry_run(engine, requests, outputs) -> int:
    """Write the layout preview on the model's canvas; say what a generation would do."""
    from ..image import layout_preview

    request = requests[0]
    c = request.config
    paths = next(iter(outputs.values()))
    if request.layout is not None:
        latent = (c.height // engine.vae_scale, c.width // engine.vae_scale)
        grid = request.layout.grid_masks(c.height, c.width, latent, c.negative_weight, c.layout_resize)
        atomic_write(paths["preview"], _png_bytes(layout_preview(request.layout.masks(c.height, c.width), grid)))
        print(f"wrote {paths['preview']} (layout on the {c.width}x{c.height} canvas, {latent[1]}x{latent[0]} latent grid)")
    print(f"checked: {len(requests)} image(s) (seeds {', '.join(str(r.config.seed) for r in requests)}) of {c.width}x{c.height}, {c.steps} steps ({c.guidance_steps} guided), "
          f"mode {c.mode}, subjects {sorted(request.subjects) or 'none'}; nothing generated (--dry-run)")
    return 0


def _outputs(args, plan: Plan) -> dict[int, dict[str, Path]]:
    """Every file this run writes, per seed, checked writable (suffix, not a folder, a folder that takes files)."""
    out = output_file(args.out, "out", (".png",))
    many = len(plan.seeds) > 1
    per = {}
    for seed in plan.seeds:
        paths = {"out": per_seed(out, seed, many)}
        if (args.preview or args.dry_run) and plan.request.layout is not None:
            paths["preview"] = output_file(per_seed(out.with_suffix(".preview.png"), seed, many), "preview", (".png",))
        if args.save_latents:
            paths["latents"] = output_file(per_seed(Path(args.save_latents), seed, many), "save-latents",
                                           (".safetensors",))
        per[seed] = paths
    if args.dry_run:      # a dry run writes one preview, nothing else
        return {plan.seeds[0]: {k: v for k, v in per[plan.seeds[0]].items() if k == "preview"}}
    return per


def _flag_settings(args) -> dict:
    """SamplingConfig fields given as flags (the seed is handled per image)."""
    flags = (("steps", "steps"), ("guidance_steps", "guidance_steps"), ("guidance_weight", "guidance_weight"),
             ("cfg", "cfg_scale"), ("negative_weight", "negative_weight"), ("layout_resize", "layout_resize"),
             ("gate_step", "gate_step"), ("cache_interval", "cache_interval"))
    return {key: getattr(args, flag) for flag, key in flags if getattr(args, flag) is not None}


def _sides(args) -> tuple[int | None, int | None]:
    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise Cones2Error("give --resolution or --height/--width, not both", "--resolution")
    return tuple(args.resolution if side is None else side for side in (args.height, args.width))


def _config(sides, mode: str, settings: dict) -> SamplingConfig:
    """The sampling settings (a placeholder side where the model decides); an explicit guidance_steps
    above the steps is an error, not a silent cut."""
    config = SamplingConfig(height=PLACEHOLDER_SIDE if sides[0] is None else sides[0],
                            width=PLACEHOLDER_SIDE if sides[1] is None else sides[1], mode=mode, **settings)
    limits.guidance_steps_within(settings.get("guidance_steps"), config.steps)
    return config


def _check_flag_values(args) -> None:
    """The flags that need no file, no model and no torch: sampling settings, seeds, strengths, output
    paths, repeated names. `_plan` checks them again with everything else; this only makes a bad
    value answer fast."""
    settings = _flag_settings(args)
    sides = _sides(args)
    if settings.get("guidance_steps") is not None and "steps" not in settings and (args.config or args.from_png):
        settings.pop("guidance_steps")       # judged against the file's steps in _plan
    _config(sides, args.mode or DEFAULT_MODE, settings)
    choose_seeds(args.seed, args.num_images)
    for flag, items in (("--subject", args.subject), ("--box", args.box), ("--strength", args.strength),
                        ("--position", args.position)):
        _pairs(items, flag)
    for name, value in _pairs(args.strength, "--strength").items():
        limits.number(numbers(value, f"--strength {name}", 1)[0], f"layout.strengths.{name}", limits.STRENGTH)
    if args.color and not args.color_map:
        raise Cones2Error("--color needs --color-map IMG", "--color")
    if args.color_map and args.box:
        raise Cones2Error("give --box or --color-map, not both", "--color-map")
    output_file(args.out, "out", (".png",))
    if args.save_latents:
        output_file(args.save_latents, "save-latents", (".safetensors",))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE flags as a dict; a name given twice is an error (the last would silently win)."""
    pairs: dict[str, str] = {}
    for item in items:
        name, value = key_value(item, flag)
        if name in pairs:
            raise Cones2Error(f"{quote(name)} is given twice ({quote(pairs[name])} and {quote(value)})", flag)
        pairs[name] = value
    return pairs


def _plan(args) -> Plan:
    """The validated request (a placeholder stands in for sides the model decides), sides and seeds."""
    from ..engine import GenerationRequest
    from ..residual import Residual

    prompt, negative, subjects, positions, layout, settings = None, "", {}, None, None, {}
    sides, mode, recorded, allow_foreign = (None, None), None, None, False
    if args.config and args.from_png:
        raise Cones2Error("give --config or --from-png, not both", "--from-png")
    if args.config:
        from .reference_config import load_reference_config

        cfg = load_reference_config(args.config)
        prompt, subjects, positions, layout, settings = cfg.prompt, cfg.subjects, cfg.positions, cfg.layout, cfg.settings
        if "guidance_steps" in settings:     # the reference clamps its guidance_steps to the steps: so do we
            settings["guidance_steps"] = min(settings["guidance_steps"], _config(sides, args.mode or DEFAULT_MODE,
                                                                                  _flag_settings(args)).steps)
    if args.from_png:
        from .from_png import read_recorded

        recorded = read_recorded(args.from_png, args.residual_dir)
        prompt, negative, subjects, positions, layout = (recorded.prompt, recorded.negative_prompt, recorded.subjects,
                                                         recorded.positions, recorded.layout)
        settings, sides, mode, allow_foreign = (dict(recorded.settings), recorded.sides, recorded.mode,
                                                recorded.allow_foreign_residuals)
    prompt = args.prompt or prompt
    if not prompt:
        raise Cones2Error("give --prompt, --config or --from-png", "prompt")
    if args.negative_prompt is not None:
        negative = args.negative_prompt
    for name, path in _pairs(args.subject, "--subject").items():
        subjects[name] = Residual.load(path, f"--subject {name}")
    for name, idx in _pairs(args.position, "--position").items():
        positions = dict(positions or {})
        positions[name] = check_positions(numbers(idx, f"--position {name}"), f"--position {name}")
    layout = _flag_layout(args, prompt, positions) or layout
    given = _flag_settings(args)
    base_seed = settings.pop("seed", 0)
    settings.update(given)
    flag_sides = _sides(args)
    if flag_sides != (None, None):
        sides = flag_sides
    config = _config(sides, args.mode or mode or DEFAULT_MODE, settings)
    if layout is not None and None not in sides:
        layout.masks(config.height, config.width)      # a region that vanishes at this size
    _check_words_in_prompt(prompt, subjects, positions)
    request = GenerationRequest(prompt, subjects, layout, config, positions, negative,
                                allow_foreign or args.allow_foreign_residual)
    return Plan(request, sides, choose_seeds(args.seed, args.num_images, base_seed), recorded)


def _flag_layout(args, prompt: str, positions):
    """The layout given by --box/--strength or --color-map/--color (None when neither is given)."""
    from ..layout import Layout

    strengths = {n: numbers(v, f"--strength {n}", 1)[0] for n, v in _pairs(args.strength, "--strength").items()}
    if args.box:
        boxes = _pairs(args.box, "--box")
        for name in strengths:
            if name not in boxes:
                raise Cones2Error(f"strength given for {quote(name)}, which has no --box{did_you_mean(name, boxes)}",
                                  "--strength")
        _check_words_in_prompt(prompt, boxes, None, "--box")
        return Layout.from_boxes({n: numbers(v, f"--box {n}", 4) for n, v in boxes.items()}, strengths,
                                 units=args.box_units or "normalized")
    if strengths:
        raise Cones2Error("--strength needs --box (a colour map takes its strengths in --color)", "--strength")
    if args.color_map:
        if not args.color:
            raise Cones2Error("--color-map needs its colours: --color R,G,B=NAME[:W]", "--color")
        table = {}
        for item in args.color:
            rgb, _, entry = item.partition("=")
            name, _, strength = entry.partition(":")
            if not rgb.strip() or not name.strip():
                raise Cones2Error(f"expected R,G,B=NAME[:W], got {quote(item)}", "--color")
            if rgb.strip() in table:
                raise Cones2Error(f"colour {rgb.strip()} is given twice", "--color")
            value = numbers(strength, f"--color {name.strip()}", 1)[0] if strength.strip() else 2.5
            table[rgb.strip()] = (name.strip(), value)
        _check_words_in_prompt(prompt, {n for n, _ in table.values()}, None, "--color")
        return Layout.from_color_map(args.color_map, table)
    return None


def _check_words_in_prompt(prompt: str, names, positions, flag: str = "--subject") -> None:
    """A subject word that is not even a substring of the prompt cannot be found in its tokens: say so
    before the model loads (with a close prompt word when there is one). Explicitly placed subjects
    (--position) need not occur."""
    text = prompt.lower()
    for name in names:
        if positions and name in positions:
            continue
        if name.lower() not in text:
            raise Cones2Error(f"subject {quote(name)} does not occur in the prompt"
                              f"{did_you_mean(name.lower(), prompt_words(prompt))}", flag)


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
