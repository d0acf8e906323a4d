"""FLOP counts in fvcore's convention: one multiply-add is one FLOP.

We use torch's own FlopCounterMode (which counts 2 per multiply-add) and halve it. It counts
linear, conv (incl. transposed), matmul/bmm/einsum and fused attention; elementwise ops are not
counted. Torch does not register its CPU flash-attention kernel, so we add it: without it every
`scaled_dot_product_attention` on CPU would silently count as zero.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from hgdeploy.layers import TokenClustering, TokenReconstruction



def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """Torch's own attention formula (QK^T and AV products), for the CPU kernel it does not register."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa


@dataclass(frozen=True)
class FlopCount:
    """GFLOPs (multiply-adds / 1e9) of one forward pass at batch 1."""

    total: float
    clustering: float  # token clustering + reconstruction layers, included in total

    def to_dict(self) -> dict[str, float]:
        return {"total": self.total, "clustering": self.clustering}


def count_gflops(model: nn.Module, example: Tensor) -> FlopCount:
    """Count one forward of `model` on `example` (batch 1 expected)."""
    root = type(model).__name__
    layer_names = [
        f"{root}.{name}" for name, mod in model.named_modules()
        if isinstance(mod, (TokenClustering, TokenReconstruction))
    ]
    counter = flop_counter.FlopCounterMode(display=False, depth=None, custom_mapping=_CUSTOM)
    with torch.no_grad(), counter:
        model(example)
    per_module = counter.get_flop_counts()
    clustering = sum(sum(per_module.get(name, {}).values()) for name in layer_names)
    return FlopCount(total=counter.get_total_flops() / 2e9, clustering=clustering / 2e9)


def count_gflops_fast(model: nn.Module, example: Tensor) -> FlopCount:
    """count_gflops on a weightless copy on the meta device: the count needs shapes, not values.

    Large models at full resolution count in seconds instead of minutes; models with an op that
    has no meta kernel (or that reads a value) are counted by running them for real.
    """
    try:
        meta = copy.deepcopy(model).to("meta")
        return count_gflops(meta, torch.zeros(example.shape, dtype=example.dtype, device="meta"))
    except (NotImplementedError, RuntimeError):
        return count_gflops(model, example)


def _dims(shapes: dict[str, list[int]], name: str) -> list[int]:
    if name not in shapes:
        raise ValueError(f"no static shape for tensor {name!r}; run shape inference first")
    return shapes[name]


def _node_macs(node, shapes: dict[str, list[int]]) -> int:  # noqa: ANN001 - onnx.NodeProto
    """Multiply-adds of one ONNX node (the same ops torch's counter counts; 0 for elementwise)."""
    import math

    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        a, out = _dims(shapes, node.input[0]), _dims(shapes, node.output[0])
        return math.prod(out) * (a[-1] if len(a) > 1 else a[0])
    if node.op_type == "Gemm":
        a, out = _dims(shapes, node.input[0]), _dims(shapes, node.output[0])
        return math.prod(out) * (a[0] if attrs.get("transA", 0) else a[1])
    if node.op_type == "Conv":
        w, out = _dims(shapes, node.input[1]), _dims(shapes, node.output[0])
        return math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = _dims(shapes, node.input[0]), _dims(shapes, node.input[1])
        return math.prod(x) * math.prod(w[1:])  # w: [C_in, C_out / group, *kernel]
    if node.op_type == "Einsum":
        sizes: dict[str, int] = {}
        for labels, name in zip(attrs["equation"].replace(" ", "").split("->")[0].split(","), node.input):
            sizes.update(zip(labels, _dims(shapes, name)))
        return math.prod(sizes.values())
    return 0


def onnx_gflops(model, is_clustering) -> FlopCount:  # noqa: ANN001 - onnx.ModelProto, Callable[[NodeProto], bool]
    """GFLOPs of an ONNX graph in the same convention, for comparing graphs before and after passes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(g.input) + list(g.output) + list(g.value_info)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    total = clustering = 0
    for node in g.node:
        macs = _node_macs(node, shapes)
        total += macs
        clustering += macs if is_clustering(node) else 0
    return FlopCount(total=total / 1e9, clustering=clustering / 1e9)
