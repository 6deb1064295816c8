"""`cones2-engine info`: what a checkpoint (and optionally a residual) is, and what can run here."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model, a residual and the available backends")
    p.add_argument("--model", help="diffusers-layout SD checkpoint dir or hub id (default: the embedded model)")
    p.add_argument("--residual", action="append", default=[], help="residual file to describe; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from .. import __version__
    from ..backends import backend_names, select_backend
    from ..engine import Engine
    from ..residual import Residual

    residuals = {path: Residual.load(path, "--residual") for path in args.residual}   # bad files: before loading
    engine = Engine.from_pretrained(args.model, backend="reference")   # builds no runner (and exports nothing)
    default, why = select_backend(engine.device, log_choice=False)
    size = engine.default_resolution
    facts = {
        "version": __version__, "model": engine.components.source, "model_id": engine.components.model_id,
        "text_dim": engine.text_dim, "prediction_type": engine.prediction_type, "default_resolution": size,
        "attention_levels": [f"{h}x{w}" for h, w in engine.level_shapes(size, size)],
        "backends": backend_names(), "default_backend": f"{default} ({why})", "cuda": torch.cuda.is_available(),
        "torch": torch.__version__, "model_fingerprint": engine.fingerprint,
        "residuals": {},
    }
    for path, r in residuals.items():
        check = _fingerprint_check(r, engine)
        facts["residuals"][path] = {**r.metadata, "rows": r.rows, "dim": r.dim, "word": r.word,
                                    "token_ids": r.token_ids, "base_model": r.base_model, "sha256": r.sha256,
                                    "fingerprint_check": check,
                                    "fits_model": r.dim == engine.text_dim and not check.startswith("differs")}
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        for k, v in facts.items():
            print(f"{k:20s} {v}")
    return 0


def _fingerprint_check(residual, engine) -> str:
    """Whether the residual was recorded as trained on this model's weights (`Engine.fingerprint`)."""
    recorded = residual.base_fingerprint
    if recorded is None:
        return "not recorded (a residual from before fingerprints, or a reference .pt): width checked only"
    if recorded == engine.fingerprint:
        return f"matches ({recorded})"
    return (f"differs: trained on {recorded}, this model is {engine.fingerprint} (generate refuses it without "
            "--allow-foreign-residual)")
