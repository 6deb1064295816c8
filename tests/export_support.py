"""One ONNX export of the embedded default model per test session, shared by the export tests.

The export runs through the CLI (`cones2-engine export onnx --out DIR`, no --model), so it also
proves that exporting the embedded model works from a fresh checkout. The embedded model is the
same tiny SD 2.x-like build as the `tiny_model_dir` fixture (v-prediction, D=32, 128 px), cached
in the session's isolated CONES2_CACHE.
"""
from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}


def exported_onnx_dir(tmp_path_factory) -> Path:
    if "onnx" not in _CACHE:
        from cones2.cli import main

        out = tmp_path_factory.mktemp("export") / "onnx"
        assert main(["export", "onnx", "--out", str(out), "--no-progress"]) == 0
        _CACHE["onnx"] = out
    return _CACHE["onnx"]
