"""Export a checkpoint's UNet (layout rectification as dynamic inputs), text encoder and VAE decoder
to ONNX with torch's dynamo exporter, check and verify each file, and write the manifest.

The export is written into a scratch folder beside `out_dir` and moved into place only when every
model passed `onnx.checker` and ONNX Runtime parity, so an interrupted or failed export leaves no
half-written directory. Opset >= 18: the dynamo exporter's opset-17 graphs do not load in ONNX
Runtime.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cones2
from cones2.atomic import atomic_directory
from cones2.errors import Cones2Error

from .contracts import Contract, ModelFacts, contracts
from .manifest import check_output_dir, write_manifest
from .unet_wrapper import TextEncoderWrapper, UNetExportWrapper, VaeDecoderWrapper, routed_by_level

MIN_OPSET = 18
DEFAULT_OPSET = 18
DTYPES = {"fp32": "float32", "fp16": "float16"}


def parse_static_shape(text: str | None, facts: ModelFacts) -> tuple[int, int] | None:
    """'HxW' (pixels) -> (H, W), checked against the model's size unit; None stays None."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise Cones2Error(f"expected HEIGHTxWIDTH in pixels such as 768x768, got {text!r}", "static_shape") from None
    for side in (h, w):
        if side < facts.size_unit or side % facts.size_unit:
            raise Cones2Error(f"sides must be positive multiples of {facts.size_unit} px, got {text!r}", "static_shape")
    return h, w


def export_onnx(model: str | os.PathLike | None, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dtype: str = "fp32", static_shape: str | None = None, verify: bool = True,
                progress: bool = True, overwrite: bool = False, ort_fusions: bool = False) -> dict:
    """Export `model` (a diffusers checkpoint dir or hub id; None = the embedded default model) to
    `out_dir` (unet.onnx, text_encoder.onnx, vae_decoder.onnx + external weight files, manifest.json).
    Returns the manifest. dtype: "fp32" or "fp16" (the rectification stays fp32 inside the graph).
    ort_fusions: fuse the UNet's attention for ONNX Runtime (`fuse_for_onnxruntime`; not for TensorRT).
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise Cones2Error(f"must be an integer >= {MIN_OPSET} (opset-17 dynamo graphs do not load in ONNX Runtime), "
                          f"got {opset!r}", "opset")
    if dtype not in DTYPES:
        raise Cones2Error(f"must be fp32 or fp16, got {dtype!r}", "dtype")
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    _require_onnx()
    engine = cones2.Engine.from_pretrained(model, device="cpu", dtype="fp32", backend="reference")
    return export_engine(engine, out, opset=opset, dtype=dtype, static_shape=static_shape, verify=verify,
                         progress=progress, ort_fusions=ort_fusions)


def export_engine(engine, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                  static_shape: str | None = None, verify: bool = True, progress: bool = True,
                  ort_fusions: bool = False) -> dict:
    """Export an already-loaded CPU fp32 engine's models to `out_dir` (see `export_onnx`; the checks of
    its arguments and of `out_dir` are the caller's). Used directly by the runtime export cache.
    ort_fusions: rewrite the UNet's plain attention into ONNX Runtime's fused MultiHeadAttention
    (`fuse_for_onnxruntime`); the graph then runs in ONNX Runtime only, not in TensorRT."""
    out = Path(out_dir)
    facts = ModelFacts.from_engine(engine)
    static = parse_static_shape(static_shape, facts)
    components = engine.components
    if dtype == "fp16":  # traced with fake tensors: no fp16 CPU kernels are needed to export
        for module in (components.unet, components.text_encoder, components.vae):
            module.half()
    cons = contracts(facts, DTYPES[dtype])
    height, width = static or (facts.default_resolution,) * 2

    with atomic_directory(out) as scratch:   # built beside `out`, renamed into place when complete
        entries = {}
        modules = {"unet": UNetExportWrapper(components.unet, list(facts.attention_levels)),
                   "text_encoder": TextEncoderWrapper(components.text_encoder),
                   "vae_decoder": VaeDecoderWrapper(components.vae)}
        bar = tqdm(total=len(cons) * (2 if verify else 1), desc="export onnx", disable=not progress)
        for name, contract in cons.items():
            bar.set_postfix_str(f"{name}: export")
            started = time.perf_counter()
            with routed_by_level(components.unet):
                _export_one(modules[name], contract, scratch / contract.filename, opset, static, height, width)
            entries[name] = contract.describe(static) | {"export_seconds": round(time.perf_counter() - started, 2)}
            if ort_fusions and name == "unet":
                entries[name]["ort_fusions"] = fuse_for_onnxruntime(scratch / contract.filename)
            bar.update()
        if verify:
            from .verify import verify_model

            if dtype == "fp16":  # the reference runs in fp32 on the same (fp16-rounded) weights
                for module in (components.unet, components.text_encoder, components.vae):
                    module.float()
            for name, contract in cons.items():
                bar.set_postfix_str(f"{name}: verify")
                entries[name]["verified"] = verify_model(engine, contract, scratch / contract.filename, static)
                bar.update()
        bar.close()
        manifest = {
            "kind": "onnx", "cones2_version": cones2.__version__, "model_id": components.model_id,
            "model_source": components.source, "opset": opset, "dtype": dtype,
            "static_shape": list(static) if static else None, "facts": facts.to_dict(), "models": entries,
            "unet_levels": {"count": facts.num_levels, "weight_inputs": cons["unet"].weight_names()},
            "torch_version": torch.__version__, "onnx_version": _version("onnx"), "onnxruntime_only": ort_fusions,
            "verified": bool(verify),
        }
        write_manifest(scratch, manifest)
    return manifest


def _export_one(module: torch.nn.Module, contract: Contract, path: Path, opset: int, static, height: int,
                width: int) -> None:
    """torch.onnx.export (dynamo) of one model at sample inputs of `contract`, then onnx.checker."""
    import onnx

    inputs = contract.sample_inputs(2, height, width)  # batch 2: torch.export specialises sizes 0 and 1
    args = tuple(inputs[name] for name in contract.input_names)
    module = module.eval()
    log = io.StringIO()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry_log.level
    try:
        registry_log.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=contract.input_names,
                              output_names=contract.output_names, dynamic_shapes=_dynamic_shapes(module, contract, static),
                              opset_version=opset, dynamo=True, external_data=True, verbose=False)
    except Exception as exc:  # the exporter's errors are long; keep the first line and the log
        raise RuntimeError(f"exporting the {contract.name} failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}\n{log.getvalue()[-2000:]}") from exc
    finally:
        registry_log.setLevel(level)
    model = onnx.load(str(path), load_external_data=False)
    _name_axes(model, contract, static)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    _check_signature(model, contract, static)


def fuse_for_onnxruntime(path: Path) -> dict[str, int]:
    """Rewrite an exported graph in place with onnxscript's ONNX Runtime fusions: the plain attention
    (MatMul-Softmax-MatMul) becomes `com.microsoft.MultiHeadAttention`, which ONNX Runtime runs
    without materialising the scores. The rectified cross-attention matches no pattern and stays as
    it is. Measured on the CPU at 768 px: one UNet call 735 ms against 1038 ms unfused, outputs
    within 1.4e-6 (docs/speed.md section 4). Returns the count of each fusion applied."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    data = path.with_name(path.name + ".data")
    unfused = path.parent / "unfused"
    unfused.mkdir()
    # The graph is read lazily from its data file, so the fused one is written beside, not over, it.
    # (This only moves files within the export's scratch folder; atomic_directory publishes it.)
    path.rename(unfused / path.name)
    data.rename(unfused / data.name)
    model, counts = optimize_for_ort(ir.load(str(unfused / path.name)))
    ir.save(model, str(path), external_data=data.name)
    del model
    for file in (unfused / path.name, unfused / data.name):
        file.unlink()
    unfused.rmdir()
    return {k: v for k, v in counts.items() if v}


def _dynamic_shapes(module: torch.nn.Module, contract: Contract, static) -> tuple:
    """Every dynamic axis of the contract as `Dim.DYNAMIC`, shaped like `module.forward`'s arguments
    (a trailing *args is one nested tuple). DYNAMIC rather than named Dims: the exporter then
    records diffusers' harmless shape guards (e.g. `batch < 64` picks a `.contiguous()`) as
    assumptions instead of failing once and retracing; `_name_axes` restores the names after."""
    axes = contract.dynamic_axes(static)
    flat = [{i: torch.export.Dim.DYNAMIC for i in axes[name]} if name in axes else None
            for name in contract.input_names]
    fixed = getattr(module, "fixed_inputs", None)
    return tuple(flat) if fixed is None else (*flat[:fixed], tuple(flat[fixed:]))


def _name_axes(model, contract: Contract, static) -> None:
    """Rename the exporter's symbols (s14, ...) to the contract's axis names everywhere in the graph,
    also inside derived output dims such as `4*((s30 - 1)//4) + 4`."""
    rename: dict[str, str] = {}
    for value, spec in zip(model.graph.input, contract.inputs(static)):
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.axes):
            if isinstance(axis, str) and dim.dim_param:
                rename.setdefault(dim.dim_param, axis)
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    # Outputs: the contract's names (e.g. `4*((latent_height - 1)//4) + 4` is latent_height at legal sizes).
    for value, spec in zip(model.graph.output, contract.outputs(static)):
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.axes):
            if isinstance(axis, str):
                dim.dim_param = axis


def _check_signature(model, contract: Contract, static) -> None:
    """The graph's inputs/outputs are exactly the contract's names, in order, with its static dims."""
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != contract.input_names or got_out != contract.output_names:
        raise RuntimeError(f"{contract.name}: exported inputs {got_in} / outputs {got_out} differ from the contract "
                           f"{contract.input_names} / {contract.output_names} (an input was dropped as unused?)")
    for value, spec in zip(model.graph.input, contract.inputs(static)):
        dims = value.type.tensor_type.shape.dim
        for dim, axis in zip(dims, spec.axes):
            if isinstance(axis, int) and dim.dim_value != axis:
                raise RuntimeError(f"{contract.name}: input {spec.name} has dims {dims}, expected {spec.axes}")


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise Cones2Error(f"ONNX export needs {', '.join(missing)}: pip install 'cones2-engine[export]'", "export")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
