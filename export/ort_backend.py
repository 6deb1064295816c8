"""`backend="onnxruntime"`: the exported UNet run by ONNX Runtime inside the engine's sampler.

`OrtUNetRunner(engine, onnx_dir, providers=None)` is what `cones2.runners.make_runner` builds; it is
called like the PyTorch runner, `runner(sample, timestep, embeddings, rectification)`, and returns
a torch tensor on the engine's device. An unguided call (rectification None) feeds coef = 0 and
zero weight maps, which the graph turns into plain attention exactly (SPEC 3). On CUDA (with
onnxruntime-gpu) inputs and output are bound to torch's GPU memory; on the CPU they go through
zero-copy numpy views. `OrtTextEncoder` and `OrtVaeDecoder` run the other two exported graphs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cones2.attention import Rectification
from cones2.errors import Cones2Error

from .contracts import TextEncoderContract, UNetContract, VaeDecoderContract
from .feeds import UNetFeeds
from .manifest import check_engine, facts, read_manifest

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise Cones2Error("needs onnxruntime: pip install 'cones2-engine[export]' (onnxruntime-gpu for CUDA)",
                          "backend") from None
    return onnxruntime


def default_providers(device: torch.device) -> list:
    """CUDA execution provider for a CUDA engine (needs onnxruntime-gpu), else the CPU one."""
    ort = _onnxruntime()
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Cones2Error("the engine runs on CUDA but this onnxruntime has no CUDA execution provider "
                          "(pip install onnxruntime-gpu), or load the engine with device='cpu'", "backend")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class _OrtModel:
    """One exported graph in an InferenceSession, fed and read as torch tensors."""

    def __init__(self, onnx_dir, contract_cls, device: torch.device, providers=None, manifest: dict | None = None,
                 threads: int | None = None):
        ort = _onnxruntime()
        self.manifest = manifest or read_manifest(onnx_dir, "onnx_dir")
        dtype = {"fp32": "float32", "fp16": "float16"}[self.manifest["dtype"]]
        self.contract = contract_cls(facts(self.manifest), dtype)
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Memory patterns are planned per input shape, and every new latent size, batch or layout level
        # is one: measured on the CPU at 768 px (docs/speed.md section 4), the first two UNet calls took
        # 4.8 s and 9.3 s with patterns against 2.9 s and 1.2 s without, and later calls were equal.
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = int(threads)
        path = Path(onnx_dir) / self.manifest["models"][self.contract.name]["file"]
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=providers or default_providers(self.device))
        except Exception as exc:  # corrupt file, missing external data, unknown provider
            raise Cones2Error(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {exc}", "onnx_dir") from None
        self.on_cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in self.session.get_providers()
        self.out_dtype = TORCH[self.contract.outputs()[0].dtype]

    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        """Run with `feeds` (cast to the contract's dtypes) and return the single output (out_shape)."""
        specs = {s.name: s for s in self.contract.inputs()}
        feeds = {k: v.to(TORCH[specs[k].dtype]).contiguous() for k, v in feeds.items()}
        if not self.on_cuda:
            arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
            out = self.session.run(self.contract.output_names, arrays)[0]
            return torch.from_numpy(out).to(self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, tensor in feeds.items():
            tensor = tensor.to(self.device)
            feeds[name] = tensor  # keep alive until the run ends
            binding.bind_input(name, "cuda", index, NUMPY[specs[name].dtype], tuple(tensor.shape), tensor.data_ptr())
        out = torch.empty(out_shape, dtype=self.out_dtype, device=self.device)
        binding.bind_output(self.contract.output_names[0], "cuda", index, NUMPY[self.contract.outputs()[0].dtype],
                            tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out


class OrtUNetRunner:
    """The exported UNet as an engine runner: `runner(sample, timestep, embeddings, rectification)`.

    sample (B, C, h, w); timestep 0-dim or (B,); embeddings (B, 77, D); rectification a
    `Rectification` with weights keyed by query count N (as the sampler builds them) or None.
    providers: ONNX Runtime execution providers (default: CUDA for a CUDA engine, else CPU);
    threads: intra-op threads (default on the CPU: torch's thread count, which `cones2.threads` sets
    by the measured rule; ONNX Runtime's own default takes every core).
    Returns the prediction (B, C, h, w) on the engine's device in sample's dtype.
    """

    name = "onnxruntime"

    def __init__(self, engine, onnx_dir: str | os.PathLike | None = None, providers: list | None = None,
                 threads: int | None = None):
        if onnx_dir is None:
            raise Cones2Error("backend 'onnxruntime' needs backend_options={'onnx_dir': DIR} "
                              "(a directory written by `cones2-engine export onnx`)", "onnx_dir")
        manifest = read_manifest(onnx_dir, "onnx_dir")
        check_engine(manifest, engine, "onnx_dir")
        self.manifest = manifest
        if threads is None and engine.device.type == "cpu":
            threads = torch.get_num_threads()
        self.model = _OrtModel(onnx_dir, UNetContract, engine.device, providers, manifest, threads)
        self.feeds = UNetFeeds(self.model.contract, manifest)
        # The exported text encoder and VAE decoder run the rest of the pipeline (see Engine.encode).
        self.text_encoder = OrtTextEncoder(onnx_dir, engine.device, providers, threads)
        self.vae_decoder = OrtVaeDecoder(onnx_dir, engine.device, providers, threads)
        self.dtype = engine.dtype

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """E(p) for token ids (B, 77), from the exported text encoder, in the engine's dtype."""
        return self.text_encoder(input_ids.to(torch.int64)).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents -> uint8 images (B, H, W, 3), from the exported VAE decoder."""
        return self.vae_decoder(latents)

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> torch.Tensor:
        feeds = self.feeds(sample, timestep, embeddings, rectification)
        return self.model.run(feeds, tuple(sample.shape)).to(sample.dtype)


class OrtTextEncoder:
    """input_ids (B, 77) int64 -> E(p) (B, 77, D), from the exported text encoder."""

    def __init__(self, onnx_dir: str | os.PathLike, device: str | torch.device = "cpu", providers: list | None = None,
                 threads: int | None = None):
        self.model = _OrtModel(onnx_dir, TextEncoderContract, torch.device(device), providers, threads=threads)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        d = self.model.contract.facts.text_dim
        return self.model.run({"input_ids": input_ids}, (input_ids.shape[0], input_ids.shape[1], d))


class OrtVaeDecoder:
    """Final latents (B, C, h, w) -> uint8 images (B, H, W, 3), like `Engine.decode`."""

    def __init__(self, onnx_dir: str | os.PathLike, device: str | torch.device = "cpu", providers: list | None = None,
                 threads: int | None = None):
        self.model = _OrtModel(onnx_dir, VaeDecoderContract, torch.device(device), providers, threads=threads)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        s = self.model.contract.facts.vae_scale
        b, _, h, w = latents.shape
        images = self.model.run({"latent": latents}, (b, 3, h * s, w * s)).float()
        pixels = (images / 2 + 0.5).clamp(0, 1)
        return (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
