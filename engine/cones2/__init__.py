"""cones2-engine: optimized inference for Cones 2 multi-subject, layout-guided image synthesis.

    engine = cones2.Engine.from_pretrained("path/to/sd21")          # diffusers layout or hub id
    dog = cones2.Residual.load("dog.safetensors")
    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.5, 0.95, 0.95)})
    result = engine.generate("a dog and a mug on the beach", {"dog": dog}, layout, seed=0)
    result.image.save("out.png")

The public names load on first use, so `import cones2` (and a command that rejects a bad flag)
does not pay for importing torch, diffusers and transformers.
"""
from __future__ import annotations

import importlib

from .errors import Cones2Error, GenerationCancelled

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Engine": "engine", "Generation": "engine", "GenerationRequest": "engine",
    "Layout": "layout", "Residual": "residual", "SamplingConfig": "config",
    "backend_names": "backends", "select_backend": "backends", "cache_root": "default_model",
    "default_dtype": "precision", "get_mode": "modes", "mode_names": "modes",
}

__all__ = ["Cones2Error", "Engine", "Generation", "GenerationCancelled", "GenerationRequest", "Layout",
           "Residual", "SamplingConfig", "__version__", "backend_names", "cache_root", "default_dtype", "get_mode",
           "mode_names", "select_backend"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
