"""What made an image, as data it carries: the `cones2` JSON chunk and A1111-style `parameters` text.

`describe_generation` lists everything a re-run needs (prompt, negative prompt, seed, sampling
settings, layout geometry, each residual's word, file name and sha256, the model's fingerprint,
backend and library versions); `cones2-engine generate --from-png` reads it back
(`cones2.cli.from_png`). The `parameters` text is the line format A1111 and ComfyUI tools read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Generation

FORMAT = "cones2-image/1"
SAMPLER_NAMES = {"paper-exact": "Euler", "fast": "DPM++ 2M"}


def versions() -> dict[str, str]:
    """The versions of the libraries that shape the pixels."""
    import diffusers
    import torch
    import transformers

    from . import __version__

    return {"cones2": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def describe_generation(gen: "Generation") -> dict:
    """The JSON-ready description of one generation (see the module docstring)."""
    req, c = gen.request, gen.request.config
    residuals = {name: {"word": r.word, "file": r.file_name, "sha256": r.sha256, "rows": r.rows, "dim": r.dim,
                        "base_fingerprint": r.base_fingerprint}
                 for name, r in req.subjects.items()}
    return {
        "format": FORMAT, "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": c.seed,
        "steps": c.steps, "guidance_steps": c.guidance_steps, "guidance_weight": c.guidance_weight,
        "cfg_scale": c.cfg_scale, "negative_weight": c.negative_weight, "height": c.height, "width": c.width,
        "mode": c.mode, "layout_resize": c.layout_resize,
        "subjects": {t.name: list(t.residual_starts) for t in gen.subject_tokens if t.name in req.subjects},
        "subject_positions": {k: list(v) for k, v in req.subject_positions.items()} if req.subject_positions else None,
        "residuals": residuals,
        "allow_foreign_residuals": req.allow_foreign_residuals,
        "layout": req.layout.describe() if req.layout is not None else None,
        "model": gen.model_id, "model_source": gen.model_source, "model_fingerprint": gen.model_fingerprint,
        "backend": gen.backend, "versions": versions(),
    }


def a1111_parameters(params: dict) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt: ...`, then `Key: value, ...` settings."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    settings = [("Steps", params.get("steps")), ("Sampler", SAMPLER_NAMES.get(params.get("mode"), params.get("mode"))),
                ("CFG scale", params.get("cfg_scale")), ("Seed", params.get("seed")),
                ("Size", f"{params.get('width')}x{params.get('height')}"),
                ("Model hash", params.get("model_fingerprint")), ("Model", params.get("model")),
                ("Cones2 guidance steps", params.get("guidance_steps")),
                ("Cones2 guidance weight", params.get("guidance_weight")),
                ("Cones2 subjects", " ".join(f"{n}:{r.get('file') or r.get('sha256', '')[:12]}"
                                             for n, r in (params.get("residuals") or {}).items()) or None),
                ("Version", f"cones2 {params['versions']['cones2']}" if params.get("versions") else None)]
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in settings if v not in (None, "")))
    return "\n".join(lines)


def _a1111_value(value) -> str:
    """A value that cannot break the comma-separated line (quoted when it holds a comma or colon)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if any(ch in text for ch in ',:"') else text
