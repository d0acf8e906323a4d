"""FLOP counts in fvcore's convention: one multiply-add is one FLOP.

We use torch's own FlopCounterMode (which counts 2 per multiply-add) and halve it. It counts
linear, conv (incl. transposed), matmul/bmm/einsum and fused attention; elementwise ops are not
counted. Torch does not register its CPU flash-attention kernel, so we add it: without it every
`scaled_dot_product_attention` on CPU would silently count as zero.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from hgdeploy.graph.flops import FlopCount
from hgdeploy.layers import BilinearUpsampling, TokenClustering, TokenPooling, TokenReconstruction


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """Torch's own attention formula (QK^T and AV products), for the CPU kernel it does not register."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa


def count_gflops(model: nn.Module, example: Tensor, parts: tuple[tuple[str, str], ...] = ()) -> FlopCount:
    """Count one forward of `model` on `example` (batch 1 expected); parts: (label, submodule path) pairs counted
    on their own too (a backbone, as papers often count it)."""
    root = type(model).__name__
    layer_names = [
        f"{root}.{name}" for name, mod in model.named_modules()
        if isinstance(mod, (TokenClustering, TokenReconstruction, TokenPooling, BilinearUpsampling))
    ]
    counter = flop_counter.FlopCounterMode(display=False, depth=None, custom_mapping=_CUSTOM)
    with torch.no_grad(), counter:
        model(example)
    per_module = counter.get_flop_counts()
    clustering = sum(sum(per_module.get(name, {}).values()) for name in layer_names)
    counted = tuple((label, sum(per_module.get(f"{root}.{path}", {}).values()) / 2e9) for label, path in parts)
    return FlopCount(total=counter.get_total_flops() / 2e9, clustering=clustering / 2e9, parts=counted)


def meta_copy(model: nn.Module) -> nn.Module:
    """The module tree with every parameter and buffer replaced by an empty tensor on the meta device.

    Built without copying a single weight (deepcopy's memo maps each tensor to its meta twin); the
    original is untouched.
    """
    memo: dict[int, object] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                               for p in model.parameters()}
    memo |= {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    return copy.deepcopy(model, memo)


def count_gflops_fast(model: nn.Module, example: Tensor, parts: tuple[tuple[str, str], ...] = ()) -> FlopCount:
    """count_gflops on a weightless copy on the meta device: the count needs shapes, not values.

    Large models at full resolution count in seconds instead of minutes; models with an op that
    has no meta kernel (or that reads a value) are counted by running them for real.
    """
    try:
        meta = meta_copy(model)
        return count_gflops(meta, torch.zeros(example.shape, dtype=example.dtype, device="meta"), parts)
    except (NotImplementedError, RuntimeError):
        return count_gflops(model, example, parts)
