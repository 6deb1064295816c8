"""Build TensorRT engines from an ONNX export, for TensorRT or TensorRT-RTX (one shared builder).

The two Python packages (`tensorrt`, `tensorrt_rtx`) share the builder API used here: OnnxParser
-> network, one optimisation profile per engine covering every dynamic axis (batch, latent size
and each level's layout weight length N_l, from `contracts`), serialise to `<model>.plan`. Both
are imported lazily, so nothing here needs them until a build is asked for.

Precision: an fp16 export is built strongly typed (the graph's own types, so the rectification
stays fp32 as exported). `fp16=True` on an fp32 export asks classic TensorRT for weakly typed
FP16 kernels; TensorRT-RTX builds strongly typed networks only and needs an fp16 export instead.
"""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

import cones2
from cones2.atomic import atomic_directory
from cones2.errors import Cones2Error

from .contracts import ShapePoint, check_profile, contracts, default_profile
from .manifest import check_output_dir, facts, read_manifest, write_manifest

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {
    "tensorrt": "TensorRT is not installed. It is not a cones2-engine extra: PyPI's `tensorrt` fetches its libraries "
                "from NVIDIA's package index; install it where that index (or NVIDIA's tarball) is available",
    "tensorrt-rtx": "TensorRT-RTX is not installed: pip install tensorrt-rtx",
}


def import_tensorrt(flavour: str = "tensorrt"):
    """The `tensorrt` or `tensorrt_rtx` module; a Cones2Error saying how to get it when absent."""
    if flavour not in FLAVOURS:
        raise Cones2Error(f"must be one of {', '.join(FLAVOURS)}, got {flavour!r}", "flavour")
    try:
        return importlib.import_module(FLAVOURS[flavour])
    except ImportError as exc:
        raise Cones2Error(f"{INSTALL_HINT[flavour]} ({exc})", "tensorrt") from None


def build_engine(trt, onnx_path: str | os.PathLike, profile: dict[str, tuple], *, strongly_typed: bool,
                 fp16: bool = False, workspace_gib: float | None = None) -> bytes:
    """Parse `onnx_path` and build one serialised engine with one optimisation profile
    (input name -> (min, opt, max) shapes)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    if hasattr(creation, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profile):
        raise RuntimeError(f"{onnx_path}: network inputs {sorted(inputs)} differ from the profile's {sorted(profile)}")
    config = builder.create_builder_config()
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return bytes(serialized)


def build_engines(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, *, flavour: str = "tensorrt",
                  fp16: bool = False, low: ShapePoint | None = None, opt: ShapePoint | None = None,
                  high: ShapePoint | None = None, models: list[str] | None = None, progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Build `<model>.plan` for each exported model (default all) into `out_dir` with a manifest.

    low/opt/high: profile corners in images and output pixels (defaults: `contracts.default_profile`).
    Returns the TensorRT manifest. Written to a scratch folder first, moved into place when done.
    """
    onnx_manifest = read_manifest(onnx_dir, "onnx")
    if onnx_manifest.get("onnxruntime_only"):
        raise Cones2Error(f"{onnx_dir} holds graphs fused for ONNX Runtime (com.microsoft ops TensorRT cannot "
                          "parse), like `onnxruntime`'s cached export; build from `cones2-engine export onnx`", "onnx")
    model_facts = facts(onnx_manifest)
    static = tuple(onnx_manifest["static_shape"]) if onnx_manifest.get("static_shape") else None
    d_low, d_opt, d_high = default_profile(model_facts, static)
    low, opt, high = low or d_low, opt or d_opt, high or d_high
    check_profile(model_facts, low, opt, high, static)
    exported = onnx_manifest["models"]
    models = list(models or exported)
    unknown = [m for m in models if m not in exported]
    if unknown:
        raise Cones2Error(f"not in the export: {', '.join(unknown)} (have {', '.join(exported)})", "models")
    half_export = onnx_manifest["dtype"] == "fp16"
    if fp16 and not half_export and flavour == "tensorrt-rtx":
        raise Cones2Error("TensorRT-RTX builds strongly typed networks only: export with `--dtype fp16` instead", "fp16")
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    trt = import_tensorrt(flavour)
    strongly_typed = not (fp16 and not half_export)
    cons = contracts(model_facts)

    with atomic_directory(out) as scratch:   # built beside `out`, renamed into place when complete
        entries = {}
        for name in tqdm(models, desc=f"build {flavour}", disable=not progress):
            profile = cons[name].profile(low, opt, high)
            started = time.perf_counter()
            plan = build_engine(trt, Path(onnx_dir) / exported[name]["file"], profile,
                                strongly_typed=strongly_typed, fp16=fp16)
            (scratch / f"{name}.plan").write_bytes(plan)
            entries[name] = {"file": f"{name}.plan", "inputs": exported[name]["inputs"],
                             "outputs": exported[name]["outputs"], "rows_per_image": exported[name]["rows_per_image"],
                             "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                             "build_seconds": round(time.perf_counter() - started, 2)}
        manifest = {
            "kind": "tensorrt", "flavour": flavour, "tensorrt_version": trt.__version__,
            "cones2_version": cones2.__version__, "model_id": onnx_manifest["model_id"],
            "dtype": onnx_manifest["dtype"], "fp16": bool(fp16 or half_export), "strongly_typed": strongly_typed,
            "static_shape": onnx_manifest.get("static_shape"), "facts": onnx_manifest["facts"],
            "profile": {"min": str(low), "opt": str(opt), "max": str(high)}, "models": entries,
            "onnx_dir": str(Path(onnx_dir).resolve()),
        }
        write_manifest(scratch, manifest)
    return manifest
