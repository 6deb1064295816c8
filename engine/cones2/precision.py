"""The one default floating-point precision of a device: fp16 on CUDA, fp32 elsewhere.

`Engine.from_pretrained`, the CLI, the Ray deployment and the bench scripts all take it from here
(docs/speed.md: fp16 is what the fused kernels and CUDA graphs are built and measured for; CPUs
run fp32, where half precision is slower and not what the exactness tests compare).
"""
from __future__ import annotations

import torch


def default_dtype(device: str | torch.device) -> str:
    """"fp16" for a CUDA device, "fp32" for any other (the name `loading.parse_dtype` takes)."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"
