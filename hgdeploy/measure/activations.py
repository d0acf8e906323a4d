"""How much memory one forward of a model needs for its activations, counted on the meta device (no weights, no
data): what the memory estimate of a heavy command is made from before any of the heavy work runs."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from hgdeploy.measure.flops import meta_copy


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors an op creates, alive until Python frees them: their peak is the forward's activation
    peak (views and in-place results share their input's memory and are not counted again)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(pytree.tree_leaves(out)):
            if not isinstance(t, Tensor) or (i < len(returns) and returns[i].alias_info is not None):
                continue
            nbytes = t.numel() * t.element_size()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, nbytes)
        return out


def activation_bytes(model: nn.Module, example: Tensor) -> int | None:
    """Peak bytes of live activations in one forward of `model` on `example`'s shape (no autograd), counted on a
    weightless meta copy in about a second; None for a model with an op that has no meta kernel."""
    try:
        meta = meta_copy(model)
        counter = _LiveBytes()
        with torch.no_grad(), counter:
            meta(torch.zeros(example.shape, dtype=example.dtype, device="meta"))
        return counter.peak
    except (NotImplementedError, RuntimeError):
        return None
