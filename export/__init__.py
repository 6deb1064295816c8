"""Ahead-of-time compilation (`cones2.export`): ONNX export, ONNX Runtime and TensorRT runners."""
