"""PyTorch as a Polygraphy runner: the reference side of parity, and torch eager timings.

The only backend module that imports torch; the deploy side never imports it.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class TorchRunner(BaseRunner):
    """Runs a torch module on the CPU with Polygraphy's runner lifecycle.

    Polygraphy's own PytRunner moves inputs to CUDA, which these machines do not have.
    """

    def __init__(self, model: torch.nn.Module, input_metadata: TensorMetadata, output_names: tuple[str, ...],
                 name: str | None = None):
        super().__init__(name=name, prefix="torch-runner")
        self._model = model
        self._input_metadata = input_metadata
        self._output_names = output_names

    def activate_impl(self) -> None:
        self._model.eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return self._input_metadata

    def infer_impl(self, feed_dict: OrderedDict) -> OrderedDict:
        inputs = [torch.as_tensor(v) for v in feed_dict.values()]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self._model(*inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, out.numpy()) for name, out in zip(self._output_names, outputs))

    def deactivate_impl(self) -> None:
        pass


def torch_runner(model: torch.nn.Module, example: torch.Tensor, output_names: tuple[str, ...], input_name: str,
                 name: str) -> TorchRunner:
    meta = TensorMetadata().add(input_name, dtype=example.numpy().dtype, shape=tuple(example.shape))
    return TorchRunner(model, meta, output_names, name=name)
