"""Check an exported model in ONNX Runtime (CPU) against the PyTorch model on the same inputs.

Run at two output sizes and two batch sizes; the UNet batches hold guided (coef > 0) and unguided
rows together, and its torch side uses the `reference` attention backend (SPEC 3 written
literally), not the exported formulation. For the UNet it also checks that the layout inputs are
live: new weight maps must change the guided rows and leave the unguided rows alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cones2.attention import AttentionContext, Rectification, get_backend

from .contracts import Contract

# max |onnx - torch| allowed, relative to max(1, max |torch|)
TOLERANCE = {"float32": 2e-3, "float16": 5e-2}


def check_points(contract: Contract, static: tuple[int, int] | None) -> list[tuple[int, int, int]]:
    """(batch rows, height, width) to check: 1 and 2 images, square and non-square (or the static size)."""
    if static:
        h, w = static
        return [(contract.rows_per_image, h, w), (2 * contract.rows_per_image, h, w)]
    u = contract.facts.size_unit
    return [(contract.rows_per_image, u, u), (2 * contract.rows_per_image, u, 2 * u)]


def ort_session(path: str | Path, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


@torch.no_grad()
def torch_reference(engine, contract: Contract, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the PyTorch model gives for the contract's inputs (fp32 on the CPU)."""
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    if contract.name == "text_encoder":
        return engine.text_encoder(f32["input_ids"], return_dict=False)[0]
    if contract.name == "vae_decoder":
        vae = engine.vae
        return vae.decode(f32["latent"] / vae.config.scaling_factor, return_dict=False)[0]
    sample = f32["sample"]
    levels = contract.facts.level_shapes(sample.shape[2] * contract.facts.vae_scale,
                                         sample.shape[3] * contract.facts.vae_scale)
    weights = {levels[lv][0] * levels[lv][1]: f32[name]
               for lv, name in zip(contract.facts.attention_levels, contract.weight_names())}
    context = AttentionContext(get_backend("reference"), Rectification(weights, f32["coef"]))
    return engine.unet(sample, f32["timestep"], encoder_hidden_states=f32["encoder_hidden_states"],
                       cross_attention_kwargs={"attention_context": context}, return_dict=False)[0]


def verify_model(engine, contract: Contract, path: str | Path, static: tuple[int, int] | None = None) -> dict:
    """Parity (and, for the UNet, liveness of the layout inputs); raises RuntimeError on failure.

    Returns {"points": [...], "max_abs_err": float, "tolerance": float, "layout_inputs_live": bool?}.
    """
    session = ort_session(path)
    report: dict = {"points": [], "max_abs_err": 0.0, "provider": "CPUExecutionProvider"}
    worst_scale = 1.0
    for seed, (batch, height, width) in enumerate(check_points(contract, static)):
        inputs = contract.sample_inputs(batch, height, width, seed=seed)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0].astype(np.float32)
        ref = torch_reference(engine, contract, inputs).float().numpy()
        err = float(np.abs(got - ref).max())
        worst_scale = max(worst_scale, float(np.abs(ref).max()))
        report["points"].append({"batch": batch, "height": height, "width": width, "max_abs_err": err})
        report["max_abs_err"] = max(report["max_abs_err"], err)
        if contract.name == "unet" and seed == 0:
            report["layout_inputs_live"] = _layout_live(session, contract, inputs, got)
    report["tolerance"] = TOLERANCE[contract.dtype] * worst_scale
    if report["max_abs_err"] > report["tolerance"]:
        raise RuntimeError(f"{contract.name}: ONNX Runtime differs from PyTorch by {report['max_abs_err']:.3g} "
                           f"(tolerance {report['tolerance']:.3g}) at {report['points']}")
    if report.get("layout_inputs_live") is False:
        raise RuntimeError("unet: changing the layout weight inputs does not change the guided rows, or changes "
                           "the unguided ones: the layout is not a live input of the exported graph")
    return report


def _layout_live(session, contract: Contract, inputs: dict[str, torch.Tensor], before: np.ndarray) -> bool:
    """Swap inside/outside of every weight map: guided rows (coef > 0) must move, unguided must not."""
    changed = dict(inputs)
    for name in contract.weight_names():
        w = inputs[name]
        changed[name] = torch.where(w > 0, -1e8, torch.where(w < 0, 2.5, w))
    after = session.run(None, {k: v.numpy() for k, v in changed.items()})[0].astype(np.float32)
    guided = (inputs["coef"] > 0).numpy()
    diff = np.abs(after - before).reshape(len(guided), -1).max(axis=1)
    return bool((diff[guided] > 1e-4).all() and (diff[~guided] == 0).all())
