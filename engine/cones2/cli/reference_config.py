"""The reference implementation's inference-config JSON, read into engine inputs.

Format: a JSON list whose first object has `prompt`, `residual_dict` {subject: path},
`color_context` {"R,G,B": [subject, strength]}, `guidance_steps`, `guidance_weight`,
`weight_negative`, `layout` (colour-map image path) and `subject_list` [[subject, token_index], ...].
Relative paths resolve against the config file's folder. Every value is checked here or by the
objects it builds (`Residual`, `Layout`, and the `SamplingConfig` the caller makes), naming its key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from ..errors import Cones2Error, quote
from ..layout import Layout
from ..residual import Residual

MAX_CONFIG_BYTES = 1024 * 1024


@dataclass
class ReferenceConfig:
    prompt: str
    subjects: dict[str, Residual]
    positions: dict[str, list[int]] | None
    layout: Layout | None
    settings: dict = field(default_factory=dict)   # guidance_steps / guidance_weight / negative_weight


def load_reference_config(path: str | Path) -> ReferenceConfig:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise Cones2Error(f"{path} is over {MAX_CONFIG_BYTES} bytes; not an inference config", "config")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Cones2Error(f"file not found: {path}", "config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Cones2Error(f"cannot read {path} as JSON: {exc}", "config") from None
    if isinstance(data, list):
        if not data or not isinstance(data[0], dict):
            raise Cones2Error("must be a JSON list whose first item is an object", "config")
        data = data[0]
    if not isinstance(data, dict):
        raise Cones2Error("must be a JSON object or a list of objects", "config")
    base = path.parent
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Cones2Error("needs a non-empty string", "config.prompt")

    residual_paths = data.get("residual_dict") or {}
    if not isinstance(residual_paths, dict) or not all(isinstance(v, str) for v in residual_paths.values()):
        raise Cones2Error("must map subject -> residual path", "config.residual_dict")
    subject_list = data.get("subject_list")
    positions: dict[str, list[int]] | None = None
    if subject_list is not None:
        positions = {}
        if not isinstance(subject_list, list):
            raise Cones2Error(f"must be a list of [subject, token_index], got {quote(subject_list)}",
                              "config.subject_list")
        for item in subject_list:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int)):
                raise Cones2Error(f"entries must be [subject, token_index], got {quote(item)}", "config.subject_list")
            positions.setdefault(limits.name(item[0], "config.subject_list"), []).append(item[1])
        names = list(positions)
    else:  # no explicit positions: every residual whose word the engine finds in the prompt
        names = [n for n in residual_paths if n.lower() in prompt.lower()]
    subjects = {}
    for name in names:
        if name not in residual_paths:
            raise Cones2Error(f"subject {quote(name)} has no entry in residual_dict", "config.subject_list")
        subjects[name] = Residual.load(base / residual_paths[name], f"config.residual_dict.{name}")

    layout = None
    if data.get("layout") or data.get("color_context"):
        if not isinstance(data.get("layout"), str) or not isinstance(data.get("color_context"), dict):
            raise Cones2Error("needs both `layout` (image path) and `color_context`", "config.layout")
        layout = Layout.from_color_map(base / data["layout"], data["color_context"])

    settings = {}
    for src, dst in (("guidance_steps", "guidance_steps"), ("guidance_weight", "guidance_weight"),
                     ("weight_negative", "negative_weight")):
        if data.get(src) is not None:
            settings[dst] = data[src]
    return ReferenceConfig(prompt, subjects, positions, layout, settings)
