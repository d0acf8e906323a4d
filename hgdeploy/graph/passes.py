"""Graph passes over an exported ONNX model: plain functions `(graph, ctx) -> graph`, in one list.

The order is explicit (PASSES). Each pass does one thing, says what it did in `ctx.notes`, and
raises instead of swallowing errors. The clustering subgraphs are found by structure the exporter
records (see hgdeploy.core.contract): every node carries the module path it came from, and the model's
metadata lists the clustering/reconstruction layers. The passes need onnx and graph-surgeon, never
torch: the clustering form is chosen once, when the model is patched, not here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs

from hgdeploy.core.contract import (
    FP16_MARKER,
    FP32_MARKER,
    LAYER_MARKERS,
    WEIGHT_ELEMENTS,
    ExportError,
    in_fp16_safe_scope,
    node_scopes,
    read_clustering_specs,
    shapes_of,
    static_shape_problems,
    write_clustering_specs,
)

FP16_MAX = 65504.0
# What a masked logit becomes: finite in fp16, and far below any logit a softmax can tell apart.
MASK_FILL = -60000.0


@dataclass
class PassContext:
    """Facts graph-surgeon does not carry (node scopes, layer specs) and what the passes decided."""

    scopes: dict[str, list[str]]
    specs: list[dict]
    notes: list[str] = field(default_factory=list)
    weights_dir: Path | None = None  # where weights left on disk are (optimize's weights_dir)


class ExternalValues(gs.ir.tensor.LazyValues):
    """graph-surgeon's lazy constant for a tensor whose bytes are in a file beside the graph: loaded from that
    folder when a pass asks (graph-surgeon looks in the working directory), exported as the same reference."""

    def __init__(self, tensor: onnx.TensorProto, folder: Path):
        super().__init__(tensor)
        self.folder = Path(folder)

    def load(self) -> np.ndarray:
        return np.array(onnx.numpy_helper.to_array(self.tensor, base_dir=str(self.folder)))


def import_graph(model: onnx.ModelProto, weights_dir: Path | None = None) -> gs.Graph:
    """graph-surgeon's graph of `model`, every tensor typed and shaped by onnx's shape inference.

    Inference runs on a weightless copy (shapes_of) and its types are set on the graph's variables, so the
    weights are never copied: the graph's constants are `model`'s own tensors until export. A ViT-H's
    2.5 GB of weights otherwise cost another 2.5 GB here.
    """
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, gs.ir.tensor.LazyValues) and lazy.tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor._values = ExternalValues(lazy.tensor, weights_dir or Path.cwd())
    inferred = gs.import_onnx(shapes_of(model)).tensors()
    for name, tensor in graph.tensors().items():
        known = inferred.get(name)
        if isinstance(tensor, gs.Variable) and known is not None:
            tensor.dtype = tensor.dtype if tensor.dtype is not None else known.dtype
            tensor.shape = tensor.shape if tensor.shape is not None else known.shape
    return graph


# ---------------------------------------------------------------------------------------- passes


def _quiet_onnxruntime() -> None:
    """graph-surgeon folds with ONNX Runtime sessions of its own, whose optimizer prints notes such as
    "UnsqueezeElimination cannot remove node" at warning level: not for users."""
    try:
        import onnxruntime
    except ImportError:  # graph-surgeon then folds without it
        return
    onnxruntime.set_default_logger_severity(3)


# Folded results larger than this stay computed in the graph (engines fold them again when they load it):
# SwinV2's per-block position-bias tables ([heads, 1024, 1024], 100 MB each in stage 3) folded took the
# optimized graph past protobuf's 2 GB limit at 544 px, where the unfolded graph is 0.8 GB. Weights (the
# largest, SwinV2-L's 1536 x 6144 matrices, are 38 MB, and are never recomputed) still fold. At 16 MB the tables
# of SwinV2-L's stage 3 (25 and 48 MB a block) stay the small MLP that makes them at run time: the pass's peak at
# 544 px went from 10.7 to 3.6 GB and the graph from 1.48 to 0.92 GB; the clustering's masks and pooling matrices
# (an [N, M] mask is 9.4 MB at Cityscapes' 768 px) still fold, which fp16_safe_masks needs.
FOLD_MAX_BYTES = 16 << 20


def fold_constants(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """Evaluate everything that depends only on constants (masks, pooling matrix, index arithmetic), up to
    FOLD_MAX_BYTES a result."""
    before = len(graph.nodes)
    _quiet_onnxruntime()
    # graph-surgeon folds in ONNX Runtime sessions made from bytes, which look for weights left on disk in the
    # working directory
    with contextlib.chdir(ctx.weights_dir or Path.cwd()):
        graph.fold_constants(error_ok=False, size_threshold=FOLD_MAX_BYTES).cleanup().toposort()
    ctx.notes.append(f"fold_constants: {before} -> {len(graph.nodes)} nodes")
    return graph


def _along(t: gs.Tensor, axis: int, rank: int) -> bool:
    """True when `t` broadcasts along `axis` of a rank-`rank` result, i.e. it is constant along it."""
    if t.shape is None:
        return False  # unknown shape: assume it varies
    shape = list(t.shape)  # a constant's too: its values may be weights left on disk
    neg = axis - rank if axis >= 0 else axis  # broadcasting aligns shapes from the right
    return -neg > len(shape) or shape[neg] == 1


def _strip_invariant(t: gs.Variable, axis: int, rank: int, dropped: list[str]) -> gs.Tensor:
    """`t` without additive terms constant along `axis` (softmax over `axis` cannot see them)."""
    if len(t.inputs) != 1 or len(t.outputs) != 1:
        return t  # a graph input or a tensor others read too: leave it as it is
    node = t.inputs[0]
    if node.op in ("Add", "Sub"):
        a, b = node.inputs
        if _along(b, axis, rank) and not _along(a, axis, rank):
            dropped.append(node.name)
            return _strip_invariant(a, axis, rank, dropped)
        if node.op == "Add" and _along(a, axis, rank) and not _along(b, axis, rank):
            dropped.append(node.name)
            return _strip_invariant(b, axis, rank, dropped)
        node.inputs[0] = _strip_invariant(a, axis, rank, dropped)
        node.inputs[1] = _strip_invariant(b, axis, rank, dropped)
    elif node.op in ("Mul", "Div") and _along(node.inputs[1], axis, rank):
        node.inputs[0] = _strip_invariant(node.inputs[0], axis, rank, dropped)
    elif node.op == "Mul" and _along(node.inputs[0], axis, rank):
        node.inputs[1] = _strip_invariant(node.inputs[1], axis, rank, dropped)
    elif node.op == "Neg":
        node.inputs[0] = _strip_invariant(node.inputs[0], axis, rank, dropped)
    return t


def drop_softmax_invariant_terms(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """Remove additive terms a softmax cannot see: those constant along its axis.

    In the clustering E-step this is each token's own squared norm ||z_p||^2 ([B, N, 1] against
    a softmax over clusters), which then no longer needs computing at all.
    """
    dropped: list[str] = []
    for node in [n for n in graph.nodes if n.op == "Softmax"]:
        x = node.inputs[0]
        if x.shape is None:
            continue
        rank = len(x.shape)
        node.inputs[0] = _strip_invariant(x, int(node.attrs.get("axis", -1)), rank, dropped)
    graph.cleanup().toposort()
    ctx.notes.append(f"drop_softmax_invariant_terms: removed {len(dropped)} additive term(s)")
    return graph


def _mask_constant(t: gs.Tensor) -> np.ndarray | None:
    """Boolean 'keep' mask when `t` is a constant of zeros and one huge value (a masking penalty)."""
    if not isinstance(t, gs.Constant):
        return None
    values = np.asarray(t.values)
    big = np.abs(values) > FP16_MAX
    if values.dtype.kind != "f" or not big.any() or np.unique(values[big]).size != 1 or (values[~big] != 0).any():
        return None
    return ~big


def fp16_safe_masks(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """x - 1e16*mask (or x + ...) -> Where(keep, x, -60000): finite in fp16, and no 0*inf anywhere. Every
    iteration's Where shares one `keep` constant per mask (the exporter writes the penalty once per use)."""
    rewritten, keeps = 0, {}
    for node in [n for n in graph.nodes if n.op in ("Add", "Sub")]:
        a, b = node.inputs
        keep = _mask_constant(b)
        if keep is None:
            continue
        sign = -1.0 if node.op == "Sub" else 1.0
        huge = float(np.asarray(b.values)[~keep].flat[0]) * sign
        fill = gs.Constant(f"{node.name}/mask_fill", np.array(MASK_FILL if huge < 0 else -MASK_FILL, dtype=b.values.dtype))
        key = (keep.shape, keep.tobytes())
        keeps.setdefault(key, gs.Constant(f"{node.name}/keep", keep))
        node.op = "Where"
        node.inputs = [keeps[key], a, fill]
        node.attrs = {}
        rewritten += 1
    graph.cleanup().toposort()
    # the scope first: reading every weight's values to find the few constants of the clustering layers cost
    # ViT-L 11 s
    bad = [t.name for t in graph.tensors().values() if isinstance(t, gs.Constant)
           and any(scope_of(c, ctx) for c in t.outputs) and np.asarray(t.values).dtype.kind == "f"
           and np.isfinite(t.values).all() and (np.abs(t.values) > FP16_MAX).any()]
    if bad:
        raise ExportError(f"constants outside fp16 range remain in the clustering layers: {bad[:3]}")
    ctx.notes.append(f"fp16_safe_masks: rewrote {rewritten} masking penalt{'y' if rewritten == 1 else 'ies'}")
    return graph


def scope_of(node: gs.Node, ctx: PassContext) -> str | None:
    """The clustering/reconstruction layer a node belongs to, if any."""
    scopes = ctx.scopes.get(node.name, ())
    return next((s["scope"] for s in ctx.specs if s["scope"] in scopes), None)


def mark_precision(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """Prefix the clustering/reconstruction nodes with FP32_MARKER, or FP16_MARKER for those of the layers'
    fp16-safe weighted sums: the fp16 conversion keeps the first in fp32, and both stay known as layer nodes
    (FLOPs, profiles) after graph-surgeon drops the exporter's scopes.

    Squared distances and their softmax overflow or lose their ordering in fp16; the weighted sums of tokens
    with normalised weights, and the transformer blocks around the layers, do not need the precision.
    """
    marked = {FP32_MARKER: 0, FP16_MARKER: 0}
    for node in graph.nodes:
        if scope_of(node, ctx) and not node.name.startswith(LAYER_MARKERS):
            marker = FP16_MARKER if in_fp16_safe_scope(ctx.scopes.get(node.name, ())) else FP32_MARKER
            old = node.name
            node.name = f"{marker}/{old}"
            ctx.scopes[node.name] = ctx.scopes.pop(old, [])
            marked[marker] += 1
    ctx.notes.append(f"mark_precision: {marked[FP32_MARKER]} nodes kept in fp32, {marked[FP16_MARKER]} fp16-safe")
    return graph


def _weightless_export(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as ONNX with its large constants turned into typed graph inputs, for shape checks: exporting
    the whole graph copies every weight (11 s for ViT-L's 1.2 GB); the graph itself is left as it is."""
    light = graph.copy()
    typed: dict[str, gs.Variable] = {}
    for node in light.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and math.prod(tensor.shape) > WEIGHT_ELEMENTS:
                if tensor.name not in typed:
                    dtype = getattr(tensor, "export_dtype", None) or tensor.dtype
                    typed[tensor.name] = gs.Variable(tensor.name, dtype=dtype, shape=list(tensor.shape))
                node.inputs[i] = typed[tensor.name]
    light.inputs.extend(typed.values())
    return gs.export_onnx(light)


def check_static(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """Refuse a graph with any data-dependent or unknown shape."""
    model = shapes_of(_weightless_export(graph))
    problems = static_shape_problems(model)
    if problems:
        raise ExportError("graph is not static after the passes: " + "; ".join(problems[:5]))
    ctx.notes.append("check_static: every shape is static")
    return graph


Pass = Callable[[gs.Graph, PassContext], gs.Graph]
PASSES: list[tuple[str, Pass]] = [
    ("fold_constants", fold_constants),
    ("drop_softmax_invariant_terms", drop_softmax_invariant_terms),
    ("fp16_safe_masks", fp16_safe_masks),
    ("mark_precision", mark_precision),
    ("check_static", check_static),
]


def optimize(model: onnx.ModelProto, passes: list[tuple[str, Pass]] | None = None,
             weights_dir: Path | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Run the passes in order; returns the new model (metadata kept) and what each pass did. A `model` loaded
    without its external weights reads them from `weights_dir` if a pass needs their values; the new model
    refers to the same files (save_onnx copies them)."""
    ctx = PassContext(node_scopes(model), read_clustering_specs(model), weights_dir=weights_dir)
    graph = import_graph(model, weights_dir)
    for _, run in passes or PASSES:
        graph = run(graph, ctx)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    write_clustering_specs(out, ctx.specs)
    return out, ctx.notes
