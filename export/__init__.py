"""Ahead-of-time compilation (`cones2.export`, docs/export.md): the UNet exported to ONNX with the
layout rectification as dynamic graph inputs, plus the text encoder and VAE decoder; ONNX Runtime
and TensorRT runners for the engine's sampler.

  contracts      names, dtypes, dynamic axes, sample inputs and TensorRT profiles per model
  unet_wrapper   the exportable UNet signature (coef + one weight map per attention level)
  graph_attention the `onnx` attention backend: SPEC 3 in fp32 ops that ONNX/TensorRT express
  onnx_export    export + onnx.checker + parity (verify) + manifest
  ort_backend    backend="onnxruntime" (OrtUNetRunner), OrtTextEncoder, OrtVaeDecoder
  trt_build      TensorRT / TensorRT-RTX engine builder (shared), trt_backend: backend="tensorrt"
  backends       registers those runners in `cones2.backends` (found via the `cones2.backends` entry point)

Nothing here is imported by the `cones2` core; the registry finds it through the entry point.
"""

from . import backends  # noqa: E402,F401  (registers onnxruntime, tensorrt and the onnx attention backend)
