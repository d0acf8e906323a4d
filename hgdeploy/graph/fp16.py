"""fp16 graphs with fp32 islands: weights and compute in fp16, inputs and outputs fp32, chosen nodes fp32.

TensorRT 11 builds only strongly typed networks (precision is what the ONNX types say) and ONNX
Runtime's CUDA provider runs a graph as typed, so the fp16 deployment is a graph of its own:
every float initializer and activation becomes fp16, except in the nodes `keep_fp32` selects (the
clustering and reconstruction layers: squared distances and their softmax lose their ordering in
fp16) and the ops in FP32_OPS (LayerNorm statistics). Explicit Casts sit on every boundary.

Written as our own pass: NVIDIA ModelOpt's AutoCast does this job but its onnx extra pins onnx 1.21
and onnxruntime-gpu 1.24 (we ship onnx 1.23 and onnxruntime 1.32) and needs cupy; onnxconverter-common's
converter failed on our graphs with type errors (ConvTranspose, Resize, MatMul islands).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hgdeploy.core.contract import ExportError, shapes_of, without_weights
from hgdeploy.graph.passes import import_graph

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
# Ops kept in fp32 wherever they are: LayerNorm's mean and variance over a wide channel axis overflow
# or lose precision in fp16 (TensorRT warns about fp16 LayerNorm for the same reason).
FP32_OPS = frozenset({"LayerNormalization"})
# Inputs that stay float32 in any region, by the ONNX spec (Resize's scales are tensor(float)) or by
# choice (its roi).
FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
# Ops whose outputs carry an explicit type: a Cast to float inside the fp16 region becomes a Cast to fp16.
TYPE_ATTRIBUTE = {"Cast": "to"}


@dataclass(frozen=True)
class Fp16Summary:
    """What the conversion did, for reports and tests."""

    fp16_weight_bytes: int
    fp32_weight_bytes: int
    fp32_nodes: int
    fp16_nodes: int
    casts: int

    @property
    def fp16_weight_share(self) -> float:
        total = self.fp16_weight_bytes + self.fp32_weight_bytes
        return self.fp16_weight_bytes / total if total else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"fp16_weight_bytes": self.fp16_weight_bytes, "fp32_weight_bytes": self.fp32_weight_bytes,
                "fp16_weight_share": self.fp16_weight_share, "fp32_nodes": self.fp32_nodes,
                "fp16_nodes": self.fp16_nodes, "casts": self.casts}


def _is_float(t: gs.Tensor) -> bool:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype == np.float32
    return t.dtype == np.float32


def _wanted(node: gs.Node, slot: int, fp32: bool) -> np.dtype:
    """The float type a node's input slot must have in the converted graph."""
    if fp32 or slot in FP32_INPUTS.get(node.op, ()):
        return np.dtype(np.float32)
    return np.dtype(np.float16)


class _Casts:
    """One Cast per (tensor, target type), created on first use."""

    def __init__(self, graph: gs.Graph):
        self.graph, self.made = graph, {}

    def of(self, tensor: gs.Variable, dtype: np.dtype) -> gs.Variable:
        key = (tensor.name, np.dtype(dtype).name)
        if key not in self.made:
            out = gs.Variable(f"{tensor.name}/as_{np.dtype(dtype).name}", dtype=dtype, shape=tensor.shape)
            to = FLOAT16 if np.dtype(dtype) == np.float16 else FLOAT
            self.graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}/cast_{np.dtype(dtype).name}",
                                            attrs={"to": to}, inputs=[tensor], outputs=[out]))
            self.made[key] = out
        return self.made[key]


def to_fp16(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool],
            fp32_ops: frozenset[str] = FP32_OPS) -> tuple[onnx.ModelProto, Fp16Summary]:
    """The model with fp16 weights and compute, fp32 graph inputs/outputs and fp32 islands; checked.

    keep_fp32(node) selects nodes (by their ONNX NodeProto) that compute in fp32, with `fp32_ops`. A
    LayerNormalization left in fp16 gets stash_type 1: the spec then computes its statistics in fp32 inside
    the op (ONNX Runtime's CPU and CUDA kernels do), so no Cast island is needed around it.
    """
    protos = {n.name: n for n in model.graph.node}
    graph = import_graph(model)
    fp32 = {id(n) for n in graph.nodes if n.op in fp32_ops or keep_fp32(protos.get(n.name, onnx.NodeProto()))}
    for node in graph.nodes:
        if node.op == "LayerNormalization" and id(node) not in fp32:
            node.attrs["stash_type"] = 1
    _half_outputs(graph, fp32)
    casts = _typed_inputs(graph, fp32)
    _float_graph_outputs(graph)
    graph.cleanup().toposort()
    converted = _exported(graph, model)
    _type_check(converted)
    return converted, summarize(converted, fp32_nodes=len(fp32), casts=len(casts.made) + sum(
        1 for n in graph.nodes if n.name.endswith("/cast_output")))


def _half_outputs(graph: gs.Graph, fp32: set[int]) -> None:
    """Step 1. Activations take the precision of the node that produces them; so do typed attributes
    (Cast's target, the tensors of Constant and ConstantOfShape)."""
    for node in graph.nodes:
        if id(node) in fp32:
            continue
        for out in node.outputs:
            if _is_float(out):
                out.dtype = np.float16
        attr = TYPE_ATTRIBUTE.get(node.op)
        if attr and node.attrs.get(attr) == FLOAT:
            node.attrs[attr] = FLOAT16
        for key, value in node.attrs.items():
            if isinstance(value, gs.Constant) and np.asarray(value.values).dtype == np.float32:
                node.attrs[key] = gs.Constant(value.name, to_half(value.values))


def _typed_inputs(graph: gs.Graph, fp32: set[int]) -> _Casts:
    """Step 2. Every float input gets the type its node computes in: constants converted once per type,
    activations (and graph inputs) through a Cast. Returns the Casts it made."""
    casts, halves = _Casts(graph), {}
    for node in list(graph.nodes):
        if node.op == "Cast" and node.name.endswith(("/cast_float16", "/cast_float32")):
            continue
        for slot, t in enumerate(node.inputs):
            if not _is_float(t) and not (isinstance(t, gs.Variable) and t.dtype == np.float16):
                continue
            want = _wanted(node, slot, id(node) in fp32)
            if isinstance(t, gs.Constant):
                if want == np.float16 and np.asarray(t.values).dtype == np.float32:
                    if t.name not in halves:
                        halves[t.name] = gs.Constant(f"{t.name}/fp16", to_half(t.values))
                    node.inputs[slot] = halves[t.name]
            elif t.dtype != want:
                node.inputs[slot] = casts.of(t, want)
    return casts


def _float_graph_outputs(graph: gs.Graph) -> None:
    """Step 3. The graph's outputs stay float32: the fp16 tensor is renamed, a Cast writes the output name."""
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype == np.float16:
            name = out.name
            out.name = f"{name}/fp16"
            final = gs.Variable(name, dtype=np.float32, shape=out.shape)
            graph.nodes.append(gs.Node("Cast", name=f"{name}/cast_output", attrs={"to": FLOAT}, inputs=[out],
                                       outputs=[final]))
            graph.outputs[i] = final


def _exported(graph: gs.Graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """The converted graph as ONNX, with the source model's IR version and metadata."""
    converted = gs.export_onnx(graph)
    converted.ir_version = model.ir_version
    for prop in model.metadata_props:
        converted.metadata_props.add(key=prop.key, value=prop.value)
    return converted


def _type_check(converted: onnx.ModelProto) -> None:
    """ExportError unless the converted model passes the checker and strict, typed shape inference."""
    try:
        onnx.checker.check_model(without_weights(converted))  # in memory the checker stops at 2 GB
        shapes_of(converted, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the fp16 graph does not type-check: {str(exc).splitlines()[0]}") from exc


def to_half(values: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 with finite values clipped to fp16's range: a mask fill of float32's minimum
    (-3.4e38, what torch writes for masked attention) would otherwise overflow to -inf, and a row
    whose every entry is masked would turn a softmax into NaN. Infinities stay infinite. Non-zero values
    below fp16's smallest subnormal keep their sign at that value instead of flushing to zero: F.normalize's
    eps (1e-12, the floor of x / max(|x|, eps)) would become 0, and a zero vector 0 / 0 = NaN (SwinV2's
    cosine attention over Swin's zero padding: its keys have no bias)."""
    values = np.asarray(values, dtype=np.float32)
    half = np.finfo(np.float16)
    limit, tiny = float(half.max), float(half.smallest_subnormal)
    clipped = np.where(np.isfinite(values), np.clip(values, -limit, limit), values)
    clipped = np.where((clipped != 0) & (np.abs(clipped) < tiny), np.copysign(tiny, clipped), clipped)
    return clipped.astype(np.float16)


def summarize(model: onnx.ModelProto, fp32_nodes: int, casts: int) -> Fp16Summary:
    size = {FLOAT: 4, FLOAT16: 2}
    nbytes = {FLOAT: 0, FLOAT16: 0}
    for init in model.graph.initializer:
        if init.data_type in size:
            nbytes[init.data_type] += size[init.data_type] * int(np.prod(init.dims))
    return Fp16Summary(fp16_weight_bytes=nbytes[FLOAT16], fp32_weight_bytes=nbytes[FLOAT], fp32_nodes=fp32_nodes,
                       fp16_nodes=len(model.graph.node) - fp32_nodes - casts, casts=casts)
