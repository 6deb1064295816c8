"""Ahead-of-time compilation (`cones2.export`, docs/export.md): the UNet exported to ONNX with the
layout rectification as dynamic graph inputs, plus the text encoder and VAE decoder; ONNX Runtime
and TensorRT runners for the engine's sampler.

  contracts      names, dtypes, dynamic axes, sample inputs and TensorRT profiles per model
  unet_wrapper   the exportable UNet signature (coef + one weight map per attention level)
  graph_attention the `onnx` attention backend: SPEC 3 in fp32 ops that ONNX/TensorRT express
  onnx_export    export + onnx.checker + parity (verify) + manifest
  ort_backend    backend="onnxruntime" (OrtUNetRunner), OrtTextEncoder, OrtVaeDecoder
  trt_build      TensorRT / TensorRT-RTX engine builder (shared), trt_backend: backend="tensorrt"

Nothing here is imported by `cones2` itself; the runners are looked up lazily by name.
"""
