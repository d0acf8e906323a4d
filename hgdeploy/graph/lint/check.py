"""Will TensorRT's ONNX parser take this graph? Answered from the graph alone: no GPU, no TensorRT.

The support table comes from the onnx/onnx-tensorrt repository: the "Operator Support Matrix" in
`docs/operators.md` (which ops, which tensor types, which restrictions) and `docs/Changelog.md`
(when each op or feature arrived). One table per TensorRT major, each standing for one release:

- TensorRT 8 = 8.6 GA, the last 8.x: operators.md as published for TensorRT 8.5 (onnx-tensorrt commit
  6d0ab7be, opsets up to 17) plus the Changelog's 8.6 EA/GA entries (GroupNormalization,
  LayerNormalization and IsInf added; INT32 TopK/ArgMax/ArgMin; TopK with a runtime K).
- TensorRT 10 = 10.0 GA, the floor of 10.x (what parses there parses on every 10.x): operators.md as
  published for TensorRT 10.15 (opsets 9-24), narrowed to 10.0 (opsets 9-20) with the Changelog:
  ops added later carry the minor they need, and features added later stay findings (Einsum
  ellipsis, diagonal and broadcasting arrived in 10.12; tensor `axes` for Slice in 10.3).

Where the matrix and the parser's source (`onnxOpImporters.cpp`/`builtin_op_importers.cpp`)
disagree, the source wins and the rule says so: Resize `mode="cubic"` has been imported since 8.x
although the matrix only lists nearest and linear.

On top of the parser sits the toolkit's own promise of static shapes (export.py): data-dependent ops
and any tensor with an unknown dimension are findings too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
from onnx import numpy_helper

from hgdeploy.core.contract import ALWAYS_DATA_DEPENDENT, CONTROL_FLOW
from hgdeploy.core.contract import infer_shapes as contract_infer_shapes
from hgdeploy.core.errors import UserError

SUPPORTED_MAJORS = (8, 10)
DEFAULT_MAJOR = 10
TOPK_MAX_K = 3840  # operators.md (10.x): "`K` input must be less than 3840"; ITopKLayer's limit
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


@dataclass(frozen=True)
class Finding:
    """One reason the parser (or the toolkit's static-shape rule) would reject the graph.

    op_type is "" for findings about a tensor (node is the tensor's name) or about the whole model
    (node is "" too).
    """

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class OpSupport:
    """One "Y" row of the matrix: its Supported Types column (ONNX type names) and the first minor
    release of the major whose parser takes the op (0: every release)."""

    types: frozenset[str]
    since_minor: int = 0


@dataclass(frozen=True)
class ParserSupport:
    """What one TensorRT major's ONNX parser takes."""

    major: int
    release: str  # the release this table stands for
    opsets: tuple[int, int]  # default-domain opsets it imports (inclusive)
    ops: Mapping[str, OpSupport]
    unsupported: frozenset[str]  # the matrix's "N" rows
    dtypes: frozenset[str]  # tensor types the parser takes at all
    io_only_dtypes: frozenset[str]  # types allowed only as network inputs/outputs
    cast_down: Mapping[str, str]  # types the parser narrows on import (no finding)


# The matrix writes types as FP32, FP16, ...; ONNX names them FLOAT, FLOAT16, ...
_MATRIX_TYPES = MappingProxyType({
    "FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "FP8": "FLOAT8E4M3FN", "FP4": "FLOAT4E2M1",
    "INT64": "INT64", "INT32": "INT32", "INT8": "INT8", "INT4": "INT4", "UINT8": "UINT8", "BOOL": "BOOL",
})

# TensorRT 8.6: operators.md for 8.5 (Supported Types column verbatim) + the 8.6 Changelog.
_TRT8_ROWS = {
    "Abs": "FP32 FP16 INT32", "Acos": "FP32 FP16", "Acosh": "FP32 FP16", "Add": "FP32 FP16 INT32",
    "And": "BOOL", "ArgMax": "FP32 FP16 INT32", "ArgMin": "FP32 FP16 INT32", "Asin": "FP32 FP16",
    "Asinh": "FP32 FP16", "Atan": "FP32 FP16", "Atanh": "FP32 FP16", "AveragePool": "FP32 FP16 INT8 INT32",
    "BatchNormalization": "FP32 FP16", "Cast": "FP32 FP16 INT32 INT8 BOOL", "Ceil": "FP32 FP16",
    "Celu": "FP32 FP16", "Clip": "FP32 FP16 INT8", "Concat": "FP32 FP16 INT32 INT8 BOOL",
    "Constant": "FP32 FP16 INT32 INT8 BOOL", "ConstantOfShape": "FP32", "Conv": "FP32 FP16 INT8",
    "ConvTranspose": "FP32 FP16 INT8", "Cos": "FP32 FP16", "Cosh": "FP32 FP16", "CumSum": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 INT32", "DequantizeLinear": "INT8", "Div": "FP32 FP16 INT32",
    "Dropout": "FP32 FP16", "Einsum": "FP32 FP16", "Elu": "FP32 FP16 INT8", "Equal": "FP32 FP16 INT32",
    "Erf": "FP32 FP16", "Exp": "FP32 FP16", "Expand": "FP32 FP16 INT32 BOOL", "EyeLike": "FP32 FP16 INT32 BOOL",
    "Flatten": "FP32 FP16 INT32 BOOL", "Floor": "FP32 FP16", "Gather": "FP32 FP16 INT8 INT32 BOOL",
    "GatherElements": "FP32 FP16 INT8 INT32 BOOL", "GatherND": "FP32 FP16 INT8 INT32 BOOL",
    "Gemm": "FP32 FP16 INT8", "GlobalAveragePool": "FP32 FP16 INT8", "GlobalLpPool": "FP32 FP16 INT8",
    "GlobalMaxPool": "FP32 FP16 INT8", "Greater": "FP32 FP16 INT32", "GreaterOrEqual": "FP32 FP16 INT32",
    "GridSample": "FP32 FP16", "GroupNormalization": "FP32 FP16", "GRU": "FP32 FP16",
    "HardSigmoid": "FP32 FP16 INT8", "HardSwish": "FP32 FP16 INT8", "Identity": "FP32 FP16 INT32 INT8 BOOL",
    "If": "FP32 FP16 INT32 BOOL", "ImageScaler": "FP32 FP16", "InstanceNormalization": "FP32 FP16",
    "IsInf": "FP32 FP16", "IsNaN": "FP32 FP16 INT32", "LayerNormalization": "FP32 FP16",
    "LeakyRelu": "FP32 FP16 INT8", "Less": "FP32 FP16 INT32", "LessOrEqual": "FP32 FP16 INT32",
    "Log": "FP32 FP16", "LogSoftmax": "FP32 FP16", "Loop": "FP32 FP16 INT32 BOOL", "LRN": "FP32 FP16",
    "LSTM": "FP32 FP16", "LpNormalization": "FP32 FP16", "LpPool": "FP32 FP16 INT8", "MatMul": "FP32 FP16",
    "Max": "FP32 FP16 INT32", "MaxPool": "FP32 FP16 INT8", "Mean": "FP32 FP16 INT32",
    "MeanVarianceNormalization": "FP32 FP16", "Min": "FP32 FP16 INT32", "Mod": "FP32 FP16 INT32",
    "Mul": "FP32 FP16 INT32", "Neg": "FP32 FP16 INT32", "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16", "Not": "BOOL", "OneHot": "FP32 FP16 INT32 BOOL", "Or": "BOOL",
    "Pad": "FP32 FP16 INT8 INT32", "ParametricSoftplus": "FP32 FP16 INT8", "Pow": "FP32 FP16",
    "PRelu": "FP32 FP16 INT8", "QuantizeLinear": "FP32 FP16", "RandomNormal": "FP32 FP16",
    "RandomNormalLike": "FP32 FP16", "RandomUniform": "FP32 FP16", "RandomUniformLike": "FP32 FP16",
    "Range": "FP32 FP16 INT32", "Reciprocal": "FP32 FP16", "ReduceL1": "FP32 FP16", "ReduceL2": "FP32 FP16",
    "ReduceLogSum": "FP32 FP16", "ReduceLogSumExp": "FP32 FP16", "ReduceMax": "FP32 FP16",
    "ReduceMean": "FP32 FP16", "ReduceMin": "FP32 FP16", "ReduceProd": "FP32 FP16", "ReduceSum": "FP32 FP16",
    "ReduceSumSquare": "FP32 FP16", "Relu": "FP32 FP16 INT8", "Reshape": "FP32 FP16 INT32 INT8 BOOL",
    "Resize": "FP32 FP16", "ReverseSequence": "FP32 FP16", "RNN": "FP32 FP16", "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 INT8", "ScaledTanh": "FP32 FP16 INT8", "Scan": "FP32 FP16",
    "Scatter": "FP32 FP16 INT8 INT32", "ScatterElements": "FP32 FP16 INT8 INT32",
    "ScatterND": "FP32 FP16 INT8 INT32", "Selu": "FP32 FP16 INT8", "Shape": "FP32 FP16 INT32 INT8 BOOL",
    "Shrink": "FP32 FP16 INT32", "Sigmoid": "FP32 FP16 INT8", "Sign": "FP32 FP16 INT8 INT32",
    "Sin": "FP32 FP16", "Sinh": "FP32 FP16", "Size": "FP32 FP16 INT32 INT8 BOOL",
    "Slice": "FP32 FP16 INT32 INT8 BOOL", "Softmax": "FP32 FP16", "Softplus": "FP32 FP16 INT8",
    "Softsign": "FP32 FP16 INT8", "SpaceToDepth": "FP32 FP16 INT32", "Split": "FP32 FP16 INT32 BOOL",
    "Sqrt": "FP32 FP16", "Squeeze": "FP32 FP16 INT32 INT8 BOOL", "Sub": "FP32 FP16 INT32",
    "Sum": "FP32 FP16 INT32", "Tan": "FP32 FP16", "Tanh": "FP32 FP16 INT8", "ThresholdedRelu": "FP32 FP16 INT8",
    "Tile": "FP32 FP16 INT32 BOOL", "TopK": "FP32 FP16 INT32", "Transpose": "FP32 FP16 INT32 INT8 BOOL",
    "Trilu": "FP32 FP16 INT32 INT8 BOOL", "Unsqueeze": "FP32 FP16 INT32 INT8 BOOL", "Upsample": "FP32 FP16",
    "Where": "FP32 FP16 INT32 BOOL", "Xor": "BOOL",
}
_TRT8_NO = frozenset({
    "Bernoulli", "BitShift", "BlackmanWindow", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT",
    "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
})

# TensorRT 10: operators.md for 10.15 (Supported Types column verbatim). "@N" marks the 10.N release
# whose Changelog entry added the op; the table stands for 10.0, so those ops are findings.
_F, _FI, _FIB = "FP32 FP16 BF16", "FP32 FP16 BF16 INT32 INT64", "FP32 FP16 BF16 INT32 INT64 BOOL"
_TRT10_ROWS = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI, "ArgMin": _FI, "Asin": _F,
    "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": "FP32 FP16 BF16 INT8 FP8 @14", "AveragePool": _F,
    "BatchNormalization": _F, "BlackmanWindow": "FP32 FP16 @4", "Cast": _FIB + " UINT8",
    "CastLike": _FIB + " UINT8", "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB,
    "Constant": _FIB + " FP8 FP4 INT4", "ConstantOfShape": _FIB + " FP8 FP4 INT4", "Conv": _F,
    "ConvTranspose": _F, "Cos": _F, "Cosh": _F, "CumSum": _F, "DeformConv": "FP32 FP16 @1",
    "DepthToSpace": _FI, "DequantizeLinear": "INT8 FP8 FP4 INT4", "Div": _FI, "Dropout": _F, "Einsum": _F,
    "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB, "Floor": _F,
    "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": _FI + " INT8", "Gemm": _F,
    "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI,
    "GridSample": "FP32 FP16", "GroupNormalization": _F, "GRU": _F, "HammingWindow": "FP32 FP16 @4",
    "HannWindow": "FP32 FP16 @4", "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB,
    "If": _FIB, "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI,
    "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F,
    "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F, "LpPool": _F, "MatMul": _F, "Max": _FI,
    "MaxPool": _F, "Mean": _FI + " FP8", "MeanVarianceNormalization": _F, "Min": _FI, "Mish": "FP32 FP16",
    "Mod": _FI, "Mul": _FI, "Neg": _FI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16", "Not": "BOOL",
    "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI, "PRelu": _F,
    "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI,
    "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _FIB, "Resize": _F,
    "ReverseSequence": _FIB, "RMSNormalization": _F + " @15", "RNN": _F, "RoiAlign": "FP32 FP16",
    "RotaryEmbedding": _F + " @15", "Round": _F, "STFT": "FP32 @5", "ScaledTanh": _F, "Scan": _F,
    "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI,
    "Sigmoid": _F, "Sign": _FI, "Sin": _F, "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F,
    "Softsign": _F, "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI,
    "Tan": _F, "Tanh": _F, "TensorScatter": "FP32 FP16 BF16 INT32 @15", "ThresholdedRelu": _F, "Tile": _FIB,
    "TopK": _FI, "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F, "Where": _FIB,
    "Xor": "BOOL",
}
_TRT10_NO = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})


def _ops(rows: Mapping[str, str]) -> Mapping[str, OpSupport]:
    """Matrix rows ("FP32 FP16 @4") -> OpSupport with ONNX type names."""
    table = {}
    for op, cell in rows.items():
        words = cell.split()
        since = [int(w[1:]) for w in words if w.startswith("@")]
        types = frozenset(_MATRIX_TYPES[w] for w in words if not w.startswith("@"))
        table[op] = OpSupport(types, since[0] if since else 0)
    return MappingProxyType(table)


SUPPORT: Mapping[int, ParserSupport] = MappingProxyType({
    8: ParserSupport(
        major=8, release="8.6", opsets=(1, 17), ops=_ops(_TRT8_ROWS), unsupported=_TRT8_NO,
        # "DOUBLE, FLOAT32, FLOAT16, INT8, and BOOL", limited INT32/INT64/DOUBLE (cast down); UINT8 I/O (8.5)
        dtypes=frozenset({"FLOAT", "FLOAT16", "INT8", "BOOL", "INT32", "INT64", "DOUBLE", "UINT8"}),
        io_only_dtypes=frozenset({"UINT8"}),
        cast_down=MappingProxyType({"INT64": "INT32", "DOUBLE": "FLOAT"}),
    ),
    10: ParserSupport(
        major=10, release="10.0", opsets=(9, 20), ops=_ops(_TRT10_ROWS), unsupported=_TRT10_NO,
        # "DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8, and BOOL"
        dtypes=frozenset({"DOUBLE", "FLOAT", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT4E2M1", "INT32",
                          "INT64", "INT8", "INT4", "UINT8", "BOOL"}),
        io_only_dtypes=frozenset({"UINT8"}),  # "UINT8 is only supported as network input or output"
        cast_down=MappingProxyType({"DOUBLE": "FLOAT"}),
    ),
})
# Per-op type checks only for plain compute types; quantized types go through Q/DQ, UINT8 is I/O-only.
_CHECKED_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"})
# Ops whose Supported Types column describes what they produce (they have no data input).
_TYPED_BY_OUTPUT = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})


def support_for(trt_major: int) -> ParserSupport:
    """The table for one TensorRT major; UserError for a major we have no table for."""
    if trt_major not in SUPPORT:
        majors = ", ".join(str(m) for m in SUPPORTED_MAJORS)
        raise UserError(f"no TensorRT support table for major version {trt_major!r}; supported: {majors}")
    return SUPPORT[trt_major]


# ---------------------------------------------------------------------------------------------------
# What the rules see of the graph


@dataclass(frozen=True)
class Graph:
    """Everything a rule may look up: constants, types and shapes by tensor name, and the table."""

    support: ParserSupport
    constants: Mapping[str, onnx.TensorProto]  # initializers and Constant outputs
    types: Mapping[str, int]  # TensorProto.DataType by tensor name
    shapes: Mapping[str, tuple[int | None, ...]]  # static dims as int, unknown as None
    base_dir: str = ""  # where external tensor data lives (lint_path)

    @property
    def major(self) -> int:
        return self.support.major

    def value(self, name: str) -> np.ndarray | None:
        """The constant's value, or None if it is not a constant (or its data is not at hand)."""
        t = self.constants.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t, base_dir=self.base_dir)
        except Exception:  # external data missing: the name is constant, the value unknown
            return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The If/Loop/Scan bodies a node holds."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, each followed by the nodes of its bodies (the parser imports those too)."""
    for node in graph.node:
        yield node
        for body in _subgraphs(node):
            yield from _walk(body)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every body inside it."""
    yield graph
    for node in graph.node:
        for body in _subgraphs(node):
            yield from _graphs(body)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a TensorProto (value, value_int(s), value_float(s))."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
            dtype = np.int64 if "int" in attr.name else np.float32
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(attr), dtype=dtype))
    return None


def _dims(t: onnx.TypeProto.Tensor) -> tuple[int | None, ...] | None:
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def build_graph(model: onnx.ModelProto, support: ParserSupport, base_dir: str = "") -> Graph:
    """Index the model (after shape inference) for the rules."""
    constants: dict[str, onnx.TensorProto] = {}
    types: dict[str, int] = {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for g in _graphs(model.graph):
        for t in g.initializer:
            constants[t.name] = t
            types[t.name] = t.data_type
            shapes[t.name] = tuple(t.dims)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
                dims = _dims(vi.type.tensor_type)
                if dims is not None:
                    shapes.setdefault(vi.name, dims)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                t = _constant_tensor(node)
                if t is not None:
                    constants[node.output[0]] = t
                    types[node.output[0]] = t.data_type
                    shapes.setdefault(node.output[0], tuple(t.dims))
    return Graph(support, MappingProxyType(constants), MappingProxyType(types), MappingProxyType(shapes), base_dir)


def bind_function(function: onnx.FunctionProto, call: onnx.NodeProto, g: Graph) -> Graph:
    """The graph as seen from inside a local function called by `call`: its formal inputs carry the
    actual inputs' constants, types and shapes; its own Constant nodes are constants."""
    constants, types, shapes = {}, {}, {}
    for formal, actual in zip(function.input, call.input):
        for table, source in ((constants, g.constants), (types, g.types), (shapes, g.shapes)):
            if actual in source:
                table[formal] = source[actual]
    for node in function.node:
        t = _constant_tensor(node) if node.op_type == "Constant" and node.output else None
        if t is not None:
            constants[node.output[0]], types[node.output[0]] = t, t.data_type
    return Graph(g.support, MappingProxyType(constants), MappingProxyType(types), MappingProxyType(shapes), g.base_dir)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    """Name of input i, "" when absent or skipped."""
    return node.input[i] if len(node.input) > i else ""


def _type_name(dtype: int) -> str:
    return onnx.TensorProto.DataType.Name(dtype)


# ---------------------------------------------------------------------------------------------------
# Op rules: (node, graph) -> reason or None. Each encodes one restriction from the sources above.

Rule = Callable[[onnx.NodeProto, Graph], "str | None"]


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


# ---------------------------------------------------------------------------------------------------
# The checks


def _node_name(node: onnx.NodeProto) -> str:
    """Nodes without a name are named by their first output."""
    return node.name or (node.output[0] if node.output else "")


def _static(dims: tuple[int | None, ...] | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def node_findings(node: onnx.NodeProto, g: Graph, functions: Mapping[tuple[str, str], onnx.FunctionProto],
                  prefix: str = "") -> list[Finding]:
    """Everything wrong with one node: domain, table, static shapes, types, op rules."""
    name, op, s = prefix + _node_name(node), node.op_type, g.support

    def found(reason: str) -> Finding:
        return Finding(name, op, reason)

    if node.domain not in DEFAULT_DOMAINS:
        function = functions.get((node.domain, op))
        if function is None:
            return [found(f'custom op in domain "{node.domain}": TensorRT needs a plugin for it')]
        if g.major < 9:
            return [found(f'ONNX local function "{node.domain}.{op}" needs TensorRT 9 or newer')]
        inner = bind_function(function, node, g)
        return [f for n in function.node for f in node_findings(n, inner, functions, f"{name}/")]
    out: list[Finding] = []
    if op in s.unsupported:
        out.append(found(f"unsupported op: TensorRT {s.major}'s ONNX parser does not support {op}"))
    elif op not in s.ops:
        out.append(found(f"unsupported op: {op} is not in TensorRT {s.major}'s ONNX support matrix"))
    elif s.ops[op].since_minor:
        out.append(found(f"unsupported op: {op} needs TensorRT {s.major}.{s.ops[op].since_minor} or newer "
                         f"(the table stands for TensorRT {s.release})"))
    if op in ALWAYS_DATA_DEPENDENT:
        out.append(found(f"data-dependent shape: {op}'s output shape depends on values; the toolkit requires "
                         "static shapes"))
    elif op in CONTROL_FLOW:
        dynamic = [o for o in node.output if o and not _static(g.shapes.get(o))]
        if dynamic:
            out.append(found(f'data-dependent shape: output "{dynamic[0]}" of {op} has no static shape'))
    if op in s.ops:
        reason = op_type_reason(node, g)
        if reason:
            out.append(found(reason))
    out.extend(found(r) for rule in RULES.get(op, ()) if (r := rule(node, g)))
    return out


def op_type_reason(node: onnx.NodeProto, g: Graph) -> str | None:
    """The matrix's Supported Types column, checked on the op's data input (or its output for
    ops that have none)."""
    names = node.output[:1] if node.op_type in _TYPED_BY_OUTPUT else [i for i in node.input if i][:1]
    if not names or names[0] not in g.types:
        return None
    dtype = _type_name(g.types[names[0]])
    dtype = g.support.cast_down.get(dtype, dtype)
    allowed = g.support.ops[node.op_type].types
    if dtype not in _CHECKED_TYPES or dtype in allowed:
        return None
    listed = ", ".join(short for short, onnx_name in _MATRIX_TYPES.items() if onnx_name in allowed)
    return f"{node.op_type} on {dtype} tensors is not supported (the matrix lists {listed})"


def tensor_findings(model: onnx.ModelProto, g: Graph) -> list[Finding]:
    """Static shapes (the toolkit) and tensor types (the parser) of the graph's named tensors."""
    graph, s = model.graph, g.support
    io = {vi.name for vi in list(graph.input) + list(graph.output)}
    out: list[Finding] = []
    seen: set[str] = set()
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in seen:
            continue
        seen.add(vi.name)
        if not vi.type.HasField("tensor_type"):
            out.append(Finding(vi.name, "", f"{vi.type.WhichOneof('value')} values are not supported, only tensors"))
            continue
        dims = _dims(vi.type.tensor_type)
        if dims is None:
            out.append(Finding(vi.name, "", "no static shape (rank unknown); the toolkit requires static shapes"))
        elif not _static(dims):
            shown = "x".join("?" if d is None else str(d) for d in dims)
            dim = next(i for i, d in enumerate(dims) if d is None)
            label = vi.type.tensor_type.shape.dim[dim].dim_param
            what = f'"{label}"' if label else "unknown"
            out.append(Finding(vi.name, "", f"dimension {dim} is {what} ({shown}), not static; the toolkit "
                                            "requires static shapes"))
        elif any(d < 0 for d in dims):
            out.append(Finding(vi.name, "", f"negative dimension in {dims}"))
    typed = [(vi.name, vi.type.tensor_type.elem_type) for vi in list(graph.input) + list(graph.output)
             + list(graph.value_info) if vi.type.HasField("tensor_type")]
    typed += [(name, g.types[name]) for name in g.constants]
    seen.clear()
    for name, dtype in typed:
        if name in seen or dtype == onnx.TensorProto.UNDEFINED:
            continue
        seen.add(name)
        dname = _type_name(dtype)
        if dname not in s.dtypes:
            out.append(Finding(name, "", f"{dname} tensors are not supported by TensorRT {s.major}"))
        elif dname in s.io_only_dtypes and name not in io and name not in g.constants:
            out.append(Finding(name, "", f"{dname} is only supported as a network input or output"))
    return out


def model_findings(model: onnx.ModelProto, support: ParserSupport) -> list[Finding]:
    """The default-domain opset must be one the parser imports."""
    lo, hi = support.opsets
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            return [Finding("", "", f"opset {imp.version} is outside what TensorRT {support.release}'s parser "
                                    f"imports ({lo} to {hi})")]
    return []


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Finding]]:
    """ONNX shape inference with data propagation (as export.check_model), lenient: a graph it
    cannot infer is linted as it is, with a finding saying so."""
    try:
        return contract_infer_shapes(model, check_type=False, strict_mode=False), []
    except Exception as e:  # inference errors surface as several exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return model, [Finding("", "", f"shape inference failed: {first}")]


def lint_model(model: onnx.ModelProto, trt_major: int = DEFAULT_MAJOR) -> list[Finding]:
    """Why TensorRT `trt_major`'s ONNX parser (or the toolkit's static-shape rule) would reject
    `model`; empty when nothing would. Model-level findings first, then nodes in graph order, then tensors."""
    return _lint(model, support_for(trt_major))


def _lint(model: onnx.ModelProto, support: ParserSupport, base_dir: str = "") -> list[Finding]:
    model, findings = infer_shapes(model)
    findings = model_findings(model, support) + findings
    g = build_graph(model, support, base_dir)
    functions = MappingProxyType({(f.domain, f.name): f for f in model.functions})
    for node in _walk(model.graph):
        findings.extend(node_findings(node, g, functions))
    return findings + tensor_findings(model, g)


def lint_path(path: str | Path, trt_major: int = DEFAULT_MAJOR) -> list[Finding]:
    """lint_model on an ONNX file. UserError (one line) if it is missing or not ONNX."""
    support = support_for(trt_major)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        # Weights stay on disk: the rules only read small constants, through Graph.value(base_dir).
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise UserError(f"{path} is not an ONNX model (no IR version or graph)")
    return _lint(model, support, str(path.parent))


def format_finding(f: Finding) -> str:
    """`TopK node "tk" (TopK): K=5000 ...`, `tensor "x": ...` or `model: ...`."""
    if f.op_type:
        return f'{f.op_type} node "{f.node}" ({f.op_type}): {f.reason}'
    if f.node:
        return f'tensor "{f.node}": {f.reason}'
    return f"model: {f.reason}"


def format_findings(findings: list[Finding]) -> str:
    """One line per finding ("" when there are none)."""
    return "\n".join(format_finding(f) for f in findings)
