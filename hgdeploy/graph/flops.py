"""FLOPs of an ONNX graph, in fvcore's convention (one multiply-add is one FLOP); no torch needed.

The same ops torch's counter counts (hgdeploy.measure.flops) are counted here from static shapes, so graphs
can be compared before and after the passes on the deploy side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import helper

from hgdeploy.core.contract import shapes_of


@dataclass(frozen=True)
class FlopCount:
    """GFLOPs (multiply-adds / 1e9) of one forward pass at batch 1."""

    total: float
    clustering: float  # token clustering + reconstruction layers, included in total
    parts: tuple[tuple[str, float], ...] = ()  # (label, GFLOPs) of named submodules (a family's `parts`)

    def to_dict(self) -> dict[str, float]:
        return {"total": self.total, "clustering": self.clustering} | {f"part_{k}": v for k, v in self.parts}


def _dims(shapes: dict[str, list[int]], name: str) -> list[int]:
    if name not in shapes:
        raise ValueError(f"no static shape for tensor {name!r}; run shape inference first")
    return shapes[name]


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-adds of one ONNX node (the same ops torch's counter counts; 0 for elementwise)."""
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
        equation = attrs["equation"]  # onnx.helper returns string attributes as bytes
        equation = equation.decode() if isinstance(equation, bytes) else equation
        for labels, name in zip(equation.replace(" ", "").split("->")[0].split(","), node.input):
            sizes.update(zip(labels, _dims(shapes, name)))
        return math.prod(sizes.values())
    return 0


def onnx_gflops(model: onnx.ModelProto, is_clustering: Callable[[onnx.NodeProto], bool]) -> FlopCount:
    """GFLOPs of an ONNX graph in the same convention, for comparing graphs before and after passes."""
    inferred = shapes_of(model)
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
