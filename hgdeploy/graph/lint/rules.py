"""Op rules: (node, graph) -> reason or None. Each encodes one restriction from the support matrix's
notes or the parser's source, and RULES lists them by op type.

Where the matrix and the parser's source (`onnxOpImporters.cpp`/`builtin_op_importers.cpp`)
disagree, the source wins and the rule says so: Resize `mode="cubic"` has been imported since 8.x
although the matrix only lists nearest and linear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import onnx

from hgdeploy.graph.lint.graph import Graph
from hgdeploy.graph.lint.support import SUPPORTED_MAJORS

TOPK_MAX_K = 3840  # operators.md (10.x): "`K` input must be less than 3840"; ITopKLayer's limit

Rule = Callable[[onnx.NodeProto, Graph], "str | None"]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    """Name of input i, "" when absent or skipped."""
    return node.input[i] if len(node.input) > i else ""


def topk_k(node: onnx.NodeProto, g: Graph) -> str | None:
    """K must be a constant (the toolkit's static shapes; 8.5's matrix: "K input must be an
    initializer") and below 3840 (10.x matrix; ITopKLayer)."""
    name = _input(node, 1)
    if not name:  # opset 1: K is the attribute k
        k = _attr(node, "k")
    elif name not in g.constants:
        return f'K comes from tensor "{name}", computed at run time; the toolkit requires a constant K'
    else:
        value = g.value(name)
        k = None if value is None or value.size != 1 else int(value.reshape(-1)[0])
    if k is not None and k >= TOPK_MAX_K:
        return f"K={k} is not below TensorRT's limit {TOPK_MAX_K}"
    return None


def topk_sorted(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "`sorted` must be 1"."""
    if g.major >= 10 and _attr(node, "sorted", 1) != 1:
        return "sorted=0 is not supported (TensorRT needs sorted=1)"
    return None


def scatter_nd_reduction(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix and importer: "`reduction` other than `none` is not supported"."""
    reduction = _attr(node, "reduction", "none")
    if reduction != "none":
        return f'reduction="{reduction}" is not supported (only "none")'
    return None


def scatter_elements_reduction(node: onnx.NodeProto, g: Graph) -> str | None:
    """Changelog 10.0 EA: "Added support for the `reduction` attribute in `ScatterElements`"."""
    reduction = _attr(node, "reduction", "none")
    if g.major < 10 and reduction != "none":
        return f'reduction="{reduction}" needs TensorRT 10 (TensorRT {g.major} takes only "none")'
    return None


def einsum_equation(node: onnx.NodeProto, g: Graph) -> str | None:
    """8.x matrix: "Ellipsis and diagonal operations are not supported. Broadcasting between inputs
    is not supported"; Changelog 10.12 added all three, so the 10.0 table keeps them out.
    IEinsumLayer: labels are lower-case letters."""
    equation = str(_attr(node, "equation", "")).replace(" ", "")
    until = " before 10.12" if g.major == 10 else ""
    if "..." in equation:
        return f'equation "{equation}" uses an ellipsis ("..."), not supported by TensorRT {g.major}{until}'
    lhs = equation.split("->")[0]
    if any(c.isalpha() and not c.islower() for c in lhs):
        return f'equation "{equation}" has upper-case labels; TensorRT\'s Einsum takes lower-case letters only'
    terms = lhs.split(",")
    for term in terms:
        repeated = sorted({c for c in term if term.count(c) > 1})
        if repeated:
            return (f'equation "{equation}" repeats label "{repeated[0]}" within one operand (a diagonal), '
                    f"not supported by TensorRT {g.major}{until}")
    sizes: dict[str, set[int]] = {}
    for i, term in enumerate(terms):
        shape = g.shapes.get(_input(node, i))
        if shape is None:
            continue
        if len(shape) != len(term):
            return f'operand {i} has rank {len(shape)} but "{term}" names {len(term)} dimensions'
        for label, dim in zip(term, shape):
            if dim is not None:
                sizes.setdefault(label, set()).add(dim)
    for label, dims in sizes.items():
        if len(dims) > 1:
            return (f'label "{label}" has sizes {sorted(dims)} across operands: broadcasting between Einsum '
                    f"inputs is not supported by TensorRT {g.major}{until}")
    return None


_RESIZE_MODES = ("nearest", "linear", "cubic")
_RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")


def resize_attributes(node: onnx.NodeProto, g: Graph) -> str | None:
    """Matrix: the transformation modes listed, no antialiasing, aspect ratio policy `stretch`.
    Modes: the matrix lists nearest and linear, but the importer maps `cubic` to kCUBIC (8.x to
    10.x), only over the two innermost dimensions."""
    mode = _attr(node, "mode", "nearest")
    if mode not in _RESIZE_MODES:
        return f'mode="{mode}" is not supported (only {", ".join(_RESIZE_MODES)})'
    coords = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if coords not in _RESIZE_COORDS:
        return f'coordinate_transformation_mode="{coords}" is not supported (only {", ".join(_RESIZE_COORDS)})'
    if _attr(node, "antialias", 0):
        return "antialias=1 is not supported"
    policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        return f'keep_aspect_ratio_policy="{policy}" is not supported (only "stretch")'
    if mode == "cubic":
        ratios = _resize_ratios(node, g)
        if ratios is not None and any(r != 1 for r in ratios[:-2]):
            return "cubic resizing is only supported on the two innermost dimensions"
    return None


def _resize_ratios(node: onnx.NodeProto, g: Graph) -> list[float] | None:
    """Per-axis output/input ratio when scales or sizes are constant (None otherwise)."""
    if _attr(node, "axes") is not None:
        return None
    scales = g.value(_input(node, 2)) if _input(node, 2) else None
    if scales is not None and scales.size:
        return [float(s) for s in scales.reshape(-1)]
    sizes = g.value(_input(node, 3)) if _input(node, 3) else None
    shape = g.shapes.get(_input(node, 0))
    if sizes is None or shape is None or len(shape) != sizes.size or None in shape:
        return None
    return [int(s) / d if d else 1.0 for s, d in zip(sizes.reshape(-1), shape)]


def resize_axes(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "When `scales` is a tensor input, `axes` must be an iota vector of length rank(input)"."""
    axes = _attr(node, "axes")
    scales = _input(node, 2)
    if axes is None or not scales or scales in g.constants:
        return None
    rank = len(g.shapes.get(_input(node, 0), ()))
    if list(axes) != list(range(rank)):
        return f"axes={list(axes)} with runtime scales is not supported (axes must be 0..rank-1 in order)"
    return None


def pool_shape(node: onnx.NodeProto, g: Graph) -> str | None:
    """Matrix: "2D or 3D pooling only"; MaxPool: "`Indices` output tensor unsupported"; 10.x: "`dilations`
    must be empty or all ones"."""
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        return f"{len(kernel)}D pooling is not supported (2D or 3D only)"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "the Indices output is not supported"
    if g.major >= 10 and any(d != 1 for d in _attr(node, "dilations", [])):
        return "dilations other than 1 are not supported"
    return None


def layer_norm_outputs(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "Only the first output `Y` is supported"."""
    if g.major >= 10 and any(node.output[1:]):
        return "only the first output Y is supported (Mean/InvStdDev are not)"
    return None


def dropout_training(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "`is_training` must be an initializer and evaluate to False"."""
    name = _input(node, 2)
    if g.major < 10 or not name:
        return None
    value = g.value(name)
    if name not in g.constants or (value is not None and bool(value.reshape(-1)[0])):
        return "is_training must be a constant False"
    return None


def constant_input(index: int, what: str, majors: tuple[int, ...] = SUPPORTED_MAJORS) -> Rule:
    """A rule: input `index` (named `what` in the matrix) must be an initializer or Constant."""

    def rule(node: onnx.NodeProto, g: Graph) -> str | None:
        name = _input(node, index)
        if g.major in majors and name and name not in g.constants:
            return f'{what} comes from tensor "{name}", computed at run time; TensorRT {g.major} needs a constant'
        return None

    rule.__name__ = f"constant_{what.replace(' ', '_')}"
    return rule


def zero_point(index: int) -> Rule:
    """Matrix: Q/DQ "`zero_point` must be zero" (checked when it is a constant)."""

    def rule(node: onnx.NodeProto, g: Graph) -> str | None:
        value = g.value(_input(node, index)) if _input(node, index) else None
        if value is not None and np.any(value.astype(np.float64) != 0):
            return "zero point must be 0"
        return None

    return rule


def constant_attributes(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported"."""
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return f"attribute {bad[0]} is not supported" if bad else None


def instance_norm_inputs(node: onnx.NodeProto, g: Graph) -> str | None:
    """8.x matrix: "Scales `scale` and biases `B` must be initializers. Input rank must be >=3 & <=5"."""
    if g.major >= 10:
        return None
    if any(name and name not in g.constants for name in node.input[1:3]):
        return "scale and B must be initializers"
    rank = len(g.shapes.get(_input(node, 0), (0, 0, 0)))
    return None if 3 <= rank <= 5 else f"input rank {rank} is not supported (3 to 5)"


def grid_sample_rank(node: onnx.NodeProto, g: Graph) -> str | None:
    """10.x matrix: "Input must be 4D input"."""
    shape = g.shapes.get(_input(node, 0))
    if g.major >= 10 and shape is not None and len(shape) != 4:
        return f"input rank {len(shape)} is not supported (4D only)"
    return None


_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
RULES: Mapping[str, tuple[Rule, ...]] = MappingProxyType({
    "TopK": (topk_k, topk_sorted),
    "ScatterND": (scatter_nd_reduction,),
    "ScatterElements": (scatter_elements_reduction,),
    "Einsum": (einsum_equation,),
    "Resize": (resize_attributes, resize_axes),
    "MaxPool": (pool_shape,),
    "AveragePool": (pool_shape,),
    "LayerNormalization": (layer_norm_outputs,),
    "Dropout": (dropout_training,),
    "Constant": (constant_attributes,),
    "InstanceNormalization": (instance_norm_inputs,),
    "GridSample": (grid_sample_rank,),
    "QuantizeLinear": (zero_point(2),),
    "DequantizeLinear": (zero_point(2),),
    "CumSum": (constant_input(1, "axis"),),
    "OneHot": (constant_input(1, "depth", (10,)),),
    "Squeeze": (constant_input(1, "axes"),),
    "Unsqueeze": (constant_input(1, "axes"),),
    "Slice": (constant_input(3, "axes"),),  # 8.x: "`axes` must be an initializer"; tensor axes since 10.3
    **{op: (constant_input(1, "axes", (10,)),) for op in _REDUCE_OPS},  # 10.x: "`axes` must be an initializer"
})
