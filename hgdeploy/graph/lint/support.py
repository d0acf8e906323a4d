"""TensorRT's ONNX support matrix as data: the ops, tensor types and opsets each major's parser takes.

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

Kept apart from the rules and the checks, so that a new TensorRT release changes tables here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hgdeploy.core.errors import UserError

SUPPORTED_MAJORS = (8, 10)
DEFAULT_MAJOR = 10
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


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
MATRIX_TYPES = MappingProxyType({
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
        types = frozenset(MATRIX_TYPES[w] for w in words if not w.startswith("@"))
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


def support_for(trt_major: int) -> ParserSupport:
    """The table for one TensorRT major; UserError for a major we have no table for."""
    if trt_major not in SUPPORT:
        majors = ", ".join(str(m) for m in SUPPORTED_MAJORS)
        raise UserError(f"no TensorRT support table for major version {trt_major!r}; supported: {majors}")
    return SUPPORT[trt_major]
