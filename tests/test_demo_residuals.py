"""The residuals shipped with the embedded demo model say which model they were trained on, so the
engine's foreign-residual check (docs/generate.md) knows them as the demo model's own."""
from __future__ import annotations

import cones2
from cones2.default_model import shipped_demo_model


def test_shipped_residuals_carry_the_demo_models_fingerprint():
    model = shipped_demo_model()
    engine = cones2.Engine.from_pretrained(model, backend="sdpa")
    files = sorted((model / "residuals").glob("*.safetensors"))
    assert [f.stem for f in files] == ["twotone_circle", "twotone_heart", "twotone_triangle"]
    assert {f.stem: cones2.Residual.load(f).base_fingerprint for f in files} == dict.fromkeys(
        (f.stem for f in files), engine.fingerprint)
