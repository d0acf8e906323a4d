"""What the layout ops between two tensors do, evaluated on an index tensor: how graph.fusion proves a head
split or merge without enumerating the layouts exporters write.

A chain of Reshape/Transpose/Slice/Squeeze/Gather/... with constant parameters moves elements without changing
them; applied to np.arange over the source's shape it gives, for every element of the result, which source
element it is. Scalar Mul/Div pass the index through: the fusion multiplies their factors into its scale.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Gather", "Identity", "Flatten"})
SCALE_OPS = frozenset({"Mul", "Div"})


def constant(t: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def _scalar(t: gs.Tensor) -> float | None:
    """A one-element float constant's value: only such a factor is one attention scale."""
    value = constant(t)
    return float(value.reshape(())) if value is not None and value.size == 1 and value.dtype.kind == "f" else None


def scale_factor(node: gs.Node, data: gs.Tensor) -> float | None:
    """The factor a Mul/Div by a scalar constant applies to `data`; None when it is not such a node."""
    if node.op not in SCALE_OPS or len(node.inputs) != 2 or data not in node.inputs:
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    value = _scalar(other)
    if value is None or (node.op == "Div" and node.inputs[1] is data) or value == 0.0:
        return None
    return value if node.op == "Mul" else 1.0 / value


def _axes(node: gs.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an input since opset 13, an attribute before."""
    if len(node.inputs) > 1:
        value = constant(node.inputs[1])
        return None if value is None else [int(a) for a in np.atleast_1d(value)]
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def _reshape(x: np.ndarray, node: gs.Node) -> np.ndarray | None:
    """Reshape with ONNX's 0 (copy the input's dimension unless allowzero) and -1."""
    shape = constant(node.inputs[1])
    if shape is None:
        return None
    dims = [int(d) for d in shape]
    if not node.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x: np.ndarray, node: gs.Node) -> np.ndarray | None:
    """Slice with constant starts/ends/axes/steps; Python's slices clamp like ONNX's for positive steps."""
    starts, ends = constant(node.inputs[1]), constant(node.inputs[2])
    axes = constant(node.inputs[3]) if len(node.inputs) > 3 else np.arange(len(starts))
    steps = constant(node.inputs[4]) if len(node.inputs) > 4 else np.ones(len(starts), dtype=np.int64)
    if any(v is None for v in (starts, ends, axes, steps)) or (np.asarray(steps) < 0).any():
        return None  # negative steps clamp differently in ONNX and numpy: not a head split anyway
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def apply_layout(x: np.ndarray, node: gs.Node) -> np.ndarray | None:
    """What a layout op does to `x` (an index array); None when its parameters are not constants."""
    op = node.op
    if op in ("Identity",) or op in SCALE_OPS:
        return x
    if op == "Reshape":
        return _reshape(x, node)
    if op == "Transpose":
        return x.transpose(node.attrs.get("perm", list(range(x.ndim))[::-1]))
    if op == "Slice":
        return _slice(x, node)
    if op == "Gather":
        index = constant(node.inputs[1])
        return None if index is None else np.take(x, index.astype(np.int64), axis=int(node.attrs.get("axis", 0)))
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
        return x.reshape(math.prod(x.shape[:axis]), -1)
    axes = _axes(node)
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
    if op == "Unsqueeze" and axes is not None:
        return np.expand_dims(x, axis=tuple(axes))
    return None
