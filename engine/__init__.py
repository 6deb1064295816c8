"""cones2-engine: optimized inference for Cones 2 multi-subject, layout-guided image synthesis.

    engine = cones2.Engine.from_pretrained("path/to/sd21")          # diffusers layout or hub id
    dog = cones2.Residual.load("dog.safetensors")
    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.3, 0.5, 0.95), "mug": (0.55, 0.5, 0.95, 0.95)})
    result = engine.generate("a dog and a mug on the beach", {"dog": dog}, layout, seed=0)
    result.image.save("out.png")
"""
from .backends import backend_names, select_backend
from .config import SamplingConfig
from .default_model import cache_root
from .engine import Engine, Generation, GenerationRequest
from .errors import Cones2Error, GenerationCancelled
from .layout import Layout
from .residual import Residual

__version__ = "0.1.0"

__all__ = ["Cones2Error", "Engine", "Generation", "GenerationCancelled", "GenerationRequest", "Layout",
           "Residual", "SamplingConfig", "__version__", "backend_names", "cache_root", "select_backend"]
