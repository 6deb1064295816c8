"""Registers the compiled UNet runners (`onnxruntime`, `tensorrt`) and the export-only `onnx`
attention backend in `cones2.backends`.

Loaded through the `cones2.backends` entry point (pyproject.toml), so the engine core finds these
without naming this package. Nothing heavy is imported here: onnxruntime and TensorRT load only
when a runner is built.
"""
from __future__ import annotations

import importlib.util

import torch

from cones2.backends import ATTENTION, BASE_ATTENTION, RUNNER, BackendOption, BackendSpec, missing_package, register


def _ort_runner(engine, onnx_dir=None, **options):
    from .ort_backend import OrtUNetRunner

    if onnx_dir is None:  # the export of this model kept in the user cache, made now on first use
        from .cache import ensure_cached_export

        onnx_dir = ensure_cached_export(engine)
    return OrtUNetRunner(engine, onnx_dir, **options)


def _trt_runner(engine, engine_dir=None, **options):
    from .trt_backend import TrtUNetRunner

    return TrtUNetRunner(engine, engine_dir, **options)


def _graph_attention():
    from .graph_attention import GraphAttention

    return GraphAttention()


def _ort_unavailable(device: torch.device) -> str | None:
    for module in ("onnxruntime", "onnx", "onnxscript"):   # all three make the export it runs
        why = missing_package(module, "pip install 'cones2-engine[export]'")
        if why:
            return why
    return None


def _trt_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "TensorRT engines run on CUDA only"
    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
        return "TensorRT is not installed (see docs/export.md)"
    return None


# Not a default anywhere since issue 29: at the thread rule's count, sdpa was as fast or faster per
# process idle and beside busy cores (bench/results/threads.md), with no first-run export and with
# fast mode's work reuse. Named (`--backend onnxruntime`) without onnx_dir, it exports once into the
# cache with attention fused (docs/speed.md section 4).
register(BackendSpec("onnxruntime", RUNNER, _ort_runner,
                     "the exported ONNX graphs (UNet, text encoder, VAE decoder) in ONNX Runtime; onnx_dir, "
                     "or an export made on first use and cached per model",
                     unavailable=_ort_unavailable, fallback=BASE_ATTENTION,
                     options=(BackendOption("onnx_dir", "onnx", "exported ONNX directory (default: the export "
                                            "cached per model)", selects=True, made_by="cones2-engine export onnx"),
                              BackendOption("providers", "", "ONNX Runtime execution providers (API only)"))))
register(BackendSpec("tensorrt", RUNNER, _trt_runner,
                     "TensorRT engines built from the ONNX graphs, CUDA graphs per shape; needs engine_dir",
                     unavailable=_trt_unavailable, needs=("engine_dir",),
                     options=(BackendOption("engine_dir", "trt", "TensorRT engine directory",
                                            made_by="cones2-engine export tensorrt"),
                              BackendOption("cuda_graphs", "", "replay CUDA graphs per shape (API only)"))))
register(BackendSpec("onnx", ATTENTION, _graph_attention,
                     "export-only: SPEC 3 in fp32 graph ops that ONNX and TensorRT express (used when tracing)"))
