"""PyTorch as a Polygraphy runner: the reference side of parity, and torch timings on the profile's device.

The only backend module that imports torch; the deploy side never imports it.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from hgdeploy.core.errors import UserError


class TorchRunner(BaseRunner):
    """Runs a torch module with Polygraphy's runner lifecycle, on the CPU or a CUDA device.

    On the CPU: eager, timed by wall clock (Polygraphy's own PytRunner moves inputs to CUDA, which most
    of our machines do not have). On CUDA the model is a copy on the device in the given dtype, the feed is
    copied into fixed device tensors before the timed region, latency is measured with CUDA events, and
    with `cuda_graph` the forward is captured once and replayed (no per-kernel launches).
    """

    def __init__(self, model: torch.nn.Module, input_metadata: TensorMetadata, output_names: tuple[str, ...],
                 name: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 cuda_graph: bool = False):
        super().__init__(name=name, prefix="torch-runner")
        self._source, self._model = model, model
        self._input_metadata = input_metadata
        self._output_names = output_names
        self._device, self._dtype, self._cuda_graph = torch.device(device), dtype, cuda_graph

    @property
    def on_cuda(self) -> bool:
        return self._device.type == "cuda"

    def activate_impl(self) -> None:
        if self.on_cuda and self._dtype == torch.float32:
            # fp32 means fp32, as the engine profiles' use_tf32 = false: cuDNN's convolutions default to TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if self.on_cuda or self._dtype != torch.float32:  # a copy: the CPU fp32 model is shared with parity
            self._model = copy.deepcopy(self._source).to(self._device, self._dtype)
        self._model.eval()
        self._static: list[torch.Tensor] = []
        self._graph = self._graph_out = None

    def get_input_metadata_impl(self) -> TensorMetadata:
        return self._input_metadata

    def _upload(self, feed_dict: OrderedDict) -> list[torch.Tensor]:
        """The feed on the model's device: copied into the same tensors every call (a CUDA graph replays on
        fixed addresses; a cache keyed on arrays' ids would serve a freed array's data to a new one)."""
        if not self.on_cuda:
            return [torch.as_tensor(v) for v in feed_dict.values()]
        tensors = [torch.as_tensor(v) for v in feed_dict.values()]
        if [t.shape for t in tensors] != [t.shape for t in self._static]:
            if self._graph is not None:
                raise UserError(f"{self.name}: a CUDA graph replays its captured input shapes "
                                f"{[tuple(t.shape) for t in self._static]}, given {[tuple(t.shape) for t in tensors]}")
            self._static = [t.to(self._device, self._dtype) for t in tensors]
        else:
            for static, new in zip(self._static, tensors):
                static.copy_(new)  # converts dtype and device
        return self._static

    def _capture(self, inputs: list[torch.Tensor]) -> None:
        """torch's CUDA-graph recipe: warm up on a side stream, capture one forward, replay it from now on."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self._model(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), torch.no_grad():
            self._graph_out = self._model(*inputs)

    def infer_impl(self, feed_dict: OrderedDict, copy_outputs_to_host: bool = True) -> OrderedDict:
        inputs = self._upload(feed_dict)
        if not self.on_cuda:
            start = time.perf_counter()
            with torch.no_grad():
                outputs = self._model(*inputs)
            self.inference_time = time.perf_counter() - start
        else:
            if self._cuda_graph and self._graph is None:
                self._capture(inputs)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            if self._graph is not None:
                self._graph.replay()
                outputs = self._graph_out
            else:
                with torch.no_grad():
                    outputs = self._model(*inputs)
            end.record()
            end.synchronize()
            self.inference_time = begin.elapsed_time(end) / 1e3
        if not copy_outputs_to_host:
            return OrderedDict()
        return OrderedDict((name, out.float().cpu().numpy()) for name, out in zip(self._output_names, outputs))

    def deactivate_impl(self) -> None:
        self._model, self._static, self._graph, self._graph_out = self._source, [], None, None


def torch_runner(model: torch.nn.Module, example: torch.Tensor, output_names: tuple[str, ...], input_name: str,
                 name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 cuda_graph: bool = False) -> TorchRunner:
    meta = TensorMetadata().add(input_name, dtype=example.numpy().dtype, shape=tuple(example.shape))
    return TorchRunner(model, meta, output_names, name=name, device=device, dtype=dtype, cuda_graph=cuda_graph)
