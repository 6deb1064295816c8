"""`backend="tensorrt"`: the UNet engine built by `cones2-engine export tensorrt`, run on CUDA.

`TrtUNetRunner(engine, engine_dir)` deserialises `unet.plan` with the TensorRT flavour recorded in
the build manifest (`tensorrt` or `tensorrt_rtx`, imported lazily with a clear error when
absent), binds torch CUDA tensors by address and enqueues on torch's current stream. With
`cuda_graphs=True` each input shape gets its own execution context whose launch is captured once
in a CUDA graph and replayed afterwards (inputs copied into the captured buffers): the sampler's
hot loop then costs one graph launch per UNet call. Contexts are per shape because a TensorRT
context may reallocate its scratch memory when its shapes change, which a captured graph must not
see. A context that cannot be captured falls back to plain enqueues.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from cones2.attention import Rectification
from cones2.errors import Cones2Error

from .contracts import UNetContract
from .feeds import UNetFeeds
from .manifest import check_engine, facts, read_manifest
from .trt_build import import_tensorrt

TORCH = {"float32": torch.float32, "float16": torch.float16}
MAX_GRAPHS = 8  # captured shapes kept (least recently used dropped first)


class TrtUNetRunner:
    """The TensorRT UNet as an engine runner: `runner(sample, timestep, embeddings, rectification)`,
    with the same arguments and result as the PyTorch runner (prediction (B, C, h, w) on CUDA)."""

    name = "tensorrt"

    def __init__(self, engine, engine_dir: str | os.PathLike | None = None, cuda_graphs: bool = True):
        if engine_dir is None:
            raise Cones2Error("backend 'tensorrt' needs backend_options={'engine_dir': DIR} "
                              "(a directory written by `cones2-engine export tensorrt`)", "engine_dir")
        manifest = read_manifest(engine_dir, "engine_dir", kind="tensorrt")
        check_engine(manifest, engine, "engine_dir")
        if "unet" not in manifest["models"]:
            raise Cones2Error(f"{engine_dir} holds no UNet engine (build it with --models unet)", "engine_dir")
        trt = import_tensorrt(manifest["flavour"])
        if engine.device.type != "cuda":
            raise Cones2Error("TensorRT runs on CUDA only: load the engine with device='cuda'", "device")
        self.trt, self.manifest, self.device = trt, manifest, engine.device
        self.contract = UNetContract(facts(manifest), {"fp32": "float32", "fp16": "float16"}[manifest["dtype"]])
        self.feeds = UNetFeeds(self.contract, manifest)
        self.profile = manifest["models"]["unet"]["profile"]
        plan = (Path(engine_dir) / manifest["models"]["unet"]["file"]).read_bytes()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            self.trt_engine = self.runtime.deserialize_cuda_engine(plan)
        if self.trt_engine is None:
            raise Cones2Error(f"cannot load {engine_dir}/unet.plan: built by another TensorRT version or for another "
                              "GPU; rebuild it here with `cones2-engine export tensorrt`", "engine_dir")
        self.cuda_graphs = cuda_graphs
        self._eager_context = None
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 rectification: Rectification | None) -> torch.Tensor:
        feeds = self.feeds(sample, timestep, embeddings, rectification)
        specs = {s.name: s for s in self.contract.inputs()}
        feeds = {k: v.to(self.device, TORCH[specs[k].dtype]).contiguous() for k, v in feeds.items()}
        self._check_profile(feeds)
        key = tuple((k, tuple(v.shape)) for k, v in feeds.items())
        if self.cuda_graphs:
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(feeds)
            if captured is not None:
                self._graphs.move_to_end(key)
                return captured.replay(feeds).to(sample.dtype)
        if self._eager_context is None:
            self._eager_context = self.trt_engine.create_execution_context()
        out = self._empty_output(feeds)
        stream = torch.cuda.current_stream(self.device)
        _bind(self._eager_context, feeds, out)
        if not self._eager_context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT enqueue failed (see the TensorRT log)")
        return out.to(sample.dtype)

    def _empty_output(self, feeds) -> torch.Tensor:
        return torch.empty(feeds["sample"].shape, dtype=TORCH[self.contract.dtype], device=self.device)

    def _check_profile(self, feeds) -> None:
        for name, tensor in feeds.items():
            low, _, high = self.profile[name]
            if any(not lo <= s <= hi for s, lo, hi in zip(tensor.shape, low, high)):
                raise Cones2Error(f"input {name} {tuple(tensor.shape)} is outside the engine's profile "
                                  f"{tuple(low)}..{tuple(high)} (profile {self.manifest['profile']}); rebuild with "
                                  "wider --min/--max", "height")

    def _capture(self, feeds) -> "_Captured | None":
        context = self.trt_engine.create_execution_context()
        static = {k: v.clone() for k, v in feeds.items()}
        out = self._empty_output(feeds)
        _bind(context, static, out)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # One plain enqueue first: TensorRT finishes shape-dependent setup outside the capture.
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT enqueue failed (see the TensorRT log)")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                context.execute_async_v3(stream.cuda_stream)
        except RuntimeError:
            self.cuda_graphs = False  # not capturable (e.g. data-dependent shapes): enqueue eagerly from now on
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return None
        torch.cuda.current_stream(self.device).wait_stream(stream)
        captured = _Captured(context, graph, static, out)
        self._graphs[tuple((k, tuple(v.shape)) for k, v in feeds.items())] = captured
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return captured


class _Captured:
    """One shape's execution context, its captured launch and the buffers the graph reads and writes."""

    def __init__(self, context, graph, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.context, self.graph, self.inputs, self.output = context, graph, inputs, output

    def replay(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in feeds.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return self.output.clone()


def _bind(context, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
    """Set input shapes and every tensor address of `context` (TensorRT 10 / TensorRT-RTX API)."""
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    context.set_tensor_address("prediction", output.data_ptr())
