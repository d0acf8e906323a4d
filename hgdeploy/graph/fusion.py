"""Attention fusion: every encoder/decoder attention block -> one com.microsoft MultiHeadAttention node.

Why: torch's dynamo exporter writes attention as MatMul -> Mul(scale) -> Softmax -> MatMul with the head
split and merge as Reshape/Transpose/Slice/Gather around it, so ONNX Runtime's CUDA provider runs it as
separate kernels (the [B, H, S, S] scores go through memory twice) and loses to PyTorch's fused SDPA.
MultiHeadAttention is the op ONNX Runtime's own fusions emit for ViT and Stable Diffusion, with
flash/memory-efficient kernels on CUDA and a float32/float16 kernel on CPU (com.microsoft `Attention`
would also take the input projection, but MultiHeadAttention keeps our projections as they are).

Our own pass, not ONNX Runtime's: `onnxruntime.transformers.optimizer.optimize_model` (model_type "vit",
"bert", "clip", "unet", "vae", "sam2", "mmdit", opt_level 0, use_multi_head_attention) fuses SkipLayerNorm
and BiasGelu on our graphs but no attention: its patterns expect the TorchScript exporter's layout.

The match does not enumerate exporter layouts. From each Softmax it finds the two MatMuls, then checks the
head split and merge by evaluating the chain of layout ops (Reshape, Transpose, Slice, Squeeze, Gather, ...)
on an index tensor: a query operand fuses only when element [b, h, s, d] provably is element
[b, s, offset + h*D + d] of one [B, S, C] tensor (or [s, b, ...] of an [S, B, C] one: nn.MultiheadAttention,
torchvision's ViT, gets a Reshape/Transpose to batch first). Scalar Mul/Div on the path multiply into `scale`.
Anything else (an additive mask, a per-head scale, another layout, a Softmax over another axis) is
reported as not fused, with the reason. The clustering/reconstruction layers' Softmax (soft k-means)
are never candidates (core.contract.is_layer_node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from hgdeploy.core.contract import is_layer_node, without_weights
from hgdeploy.core.files import JsonObject
from hgdeploy.graph.layout import LAYOUT_OPS, SCALE_OPS, apply_layout, constant, scale_factor
from hgdeploy.graph.passes import import_graph

MS_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"


class NotFused(Exception):
    """A Softmax that is not (provably) multi-head attention; the message says why."""


@dataclass(frozen=True)
class Unfused:
    """One attention candidate left as it is."""

    softmax: str
    reason: str


@dataclass
class FusionSummary:
    """What fuse_attention found in one graph: candidates (Softmax outside the clustering layers), fused
    blocks, and every candidate not fused with its reason."""

    graph: str
    found: int = 0
    fused: list[str] = field(default_factory=list)
    not_fused: list[Unfused] = field(default_factory=list)
    layer_softmax: int = 0

    def to_json(self) -> JsonObject:
        """For reports: counts, the fused nodes' names and the reasons."""
        return {"graph": self.graph, "found": self.found, "fused": len(self.fused),
                "fused_nodes": list(self.fused), "clustering_softmax_skipped": self.layer_softmax,
                "not_fused": [{"softmax": u.softmax, "reason": u.reason} for u in self.not_fused]}


@dataclass(frozen=True)
class Operand:
    """Where one attention operand comes from: `width` channels at `offset` of a [B, S, C] tensor, times `scale`."""

    tensor: gs.Variable
    offset: int
    width: int
    scale: float
    seq_first: bool = False  # the tensor is [S, B, C] (nn.MultiheadAttention's layout), not [B, S, C]


@dataclass(frozen=True)
class Match:
    """One attention block, proven: its operands, heads, total scale and its merged [B, S, hidden] output."""

    softmax: gs.Node
    query: Operand
    key: Operand
    value: Operand
    heads: int
    scale: float
    output: gs.Variable
    output_seq_first: bool = False  # the merged output is [S, B, C] or [S*B, C] ([B, S, C] or [B*S, C] otherwise)


# ------------------------------------------------------------------------------------------------ matching


def _only_consumer(t: gs.Variable, outputs: set[str]) -> gs.Node | None:
    """The one node reading `t`, when nothing else (no other node, not the graph's outputs) does."""
    return t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None


def _producer_step(t: gs.Variable) -> tuple[gs.Variable, gs.Node, float] | None:
    """(input, node, factor) when `t` is made by a layout op or a scalar Mul/Div from one variable."""
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    variables = [i for i in node.inputs if isinstance(i, gs.Variable) and constant(i) is None]
    if len(variables) != 1 or node.inputs[0] is not variables[0] and node.op not in SCALE_OPS:
        return None
    data = variables[0]
    if node.op in LAYOUT_OPS:
        return data, node, 1.0
    factor = scale_factor(node, data)
    return (data, node, factor) if factor is not None else None


def _expected(batch: int, heads: int, seq: int, dim: int, channels: int, offset: int, seq_first: bool) -> np.ndarray:
    """Index, in a [B, S, C] (or [S, B, C]) tensor, of element [b, h, s, d] of its head split at `offset`."""
    b, h, s, d = np.ix_(np.arange(batch), np.arange(heads), np.arange(seq), np.arange(dim))
    row = s * batch + b if seq_first else b * seq + s
    return row * channels + offset + h * dim + d


def _try_source(source: gs.Variable, nodes: list[gs.Node], want: tuple[int, ...], transposed: bool
                ) -> tuple[int, bool] | None:
    """(offset, seq_first) when `nodes` applied to `source`, [B, S, C] or [S, B, C], give its head split (keys:
    transposed)."""
    shape = source.shape
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        return None
    batch, heads, seq, dim = (want[0], want[1], want[3], want[2]) if transposed else want
    orders = [seq_first for seq_first, dims in ((False, (batch, seq)), (True, (seq, batch))) if tuple(shape[:2]) == dims]
    if not orders:
        return None
    index = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    for node in nodes:
        index = apply_layout(index, node)
        if index is None:
            return None
    if index.shape != want:
        return None
    offset, channels = int(index.flat[0]), int(shape[2])
    if offset + heads * dim > channels:
        return None
    for seq_first in orders:
        expected = _expected(batch, heads, seq, dim, channels, offset, seq_first)
        if np.array_equal(index, expected.transpose(0, 1, 3, 2) if transposed else expected):
            return offset, seq_first
    return None


def trace_operand(t: gs.Variable, transposed: bool, what: str) -> Operand:
    """The [B, S, C] tensor whose head split `t` is ([B, H, S, D]; keys [B, H, D, S]), found by evaluating the
    layout ops between them on an index tensor; the farthest such tensor wins."""
    want = tuple(t.shape or ())
    if len(want) != 4 or not all(isinstance(d, int) for d in want):
        raise NotFused(f"the {what} operand has no static [B, heads, ., .] shape: {t.shape}")
    steps, cur = [], t
    while (step := _producer_step(cur)) is not None:
        steps.append(step)
        cur = step[0]
    for i in range(len(steps) - 1, -1, -1):
        nodes = [node for _, node, _ in steps[: i + 1]][::-1]
        found = _try_source(steps[i][0], nodes, want, transposed)
        if found is not None:
            width = want[1] * (want[2] if transposed else want[3])
            return Operand(steps[i][0], found[0], width, math.prod(f for _, _, f in steps[: i + 1]), found[1])
    stop = cur.inputs[0] if len(cur.inputs) == 1 else None
    if stop is not None and stop.op in SCALE_OPS:
        raise NotFused(f"the {what} operand passes through {stop.op} {stop.name}, not by a scalar constant")
    raise NotFused(f"the {what} operand is not a head split of one [B, S, C] tensor (layout ops: "
                   f"{[node.op for _, node, _ in steps]})")


def merged_output(o: gs.Variable, outputs: set[str]) -> tuple[gs.Variable, bool]:
    """The tensor the attention output [B, H, S, Dv] is merged into by layout ops alone: [B, S, heads*Dv] or
    [B*S, heads*Dv], or sequence first ([S, B, heads*Dv], [S*B, heads*Dv]: nn.MultiheadAttention); and whether
    it is sequence first."""
    batch, _, seq, _ = o.shape
    index = np.arange(math.prod(o.shape), dtype=np.int64).reshape(o.shape)
    merged = {False: index.transpose(0, 2, 1, 3), True: index.transpose(2, 0, 1, 3)}
    wants = [(first, m.reshape(*m.shape[:2], -1)) for first, m in merged.items()]
    wants += [(first, m.reshape(batch * seq, -1)) for first, m in merged.items()]
    cur, ops = o, []
    while (node := _only_consumer(cur, outputs)) is not None and node.op in LAYOUT_OPS and node.inputs[0] is cur:
        index = apply_layout(index, node)
        if index is None or len(node.outputs) != 1:
            break
        cur = node.outputs[0]
        ops.append(node.op)
        for seq_first, want in wants:
            if index.shape == want.shape and np.array_equal(index, want):
                return cur, seq_first
    raise NotFused(f"the attention output is not merged back to [B, S, heads*head_dim] by layout ops (after {ops})")


def _scores(softmax: gs.Node, outputs: set[str]) -> tuple[gs.Node, float]:
    """The MatMul(query, key^T) feeding the Softmax, and the scalar factors between them."""
    x = softmax.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if rank != 4:
        raise NotFused(f"the Softmax input has rank {rank}, not [B, heads, S, L]")
    axis = int(softmax.attrs.get("axis", -1))
    if axis not in (-1, rank - 1):
        raise NotFused(f"the Softmax runs over axis {axis}, not over the keys (last axis)")
    scale, cur = 1.0, x
    while len(cur.inputs) == 1 and cur.inputs[0].op in SCALE_OPS:
        node = cur.inputs[0]
        data = next((i for i in node.inputs if constant(i) is None), None)
        factor = scale_factor(node, data) if data is not None else None
        if factor is None:
            raise NotFused(f"the scores pass through {node.op} {node.name}, not by a scalar constant")
        if _only_consumer(data, outputs) is None:
            raise NotFused(f"the unscaled scores are read elsewhere ({data.name})")
        scale, cur = scale * factor, data
    node = cur.inputs[0] if len(cur.inputs) == 1 else None
    if node is None or node.op != "MatMul":
        op = node.op if node is not None else "a graph input"
        hint = " (an additive mask or bias; not taken as attention_bias)" if op in ("Add", "Sub", "Where") else ""
        raise NotFused(f"the scores come from {op}{hint}, not from MatMul(query, key^T)")
    if _only_consumer(cur, outputs) is None:
        raise NotFused(f"the raw scores are read elsewhere ({cur.name})")
    return node, scale


def match_attention(softmax: gs.Node, outputs: set[str]) -> Match:
    """The attention block around `softmax`, every layout proven; NotFused with the reason otherwise."""
    qk, score_scale = _scores(softmax, outputs)
    pv = _only_consumer(softmax.outputs[0], outputs)
    if pv is None or pv.op != "MatMul" or pv.inputs[0] is not softmax.outputs[0]:
        raise NotFused("the attention probabilities feed something other than one MatMul(probs, value)")
    query = trace_operand(qk.inputs[0], transposed=False, what="query")
    key = trace_operand(qk.inputs[1], transposed=True, what="key")
    value = trace_operand(pv.inputs[1], transposed=False, what="value")
    if value.scale != 1.0:
        raise NotFused(f"the values are scaled by {value.scale}: MultiHeadAttention has no value scale")
    if len(pv.outputs[0].shape or ()) != 4:
        raise NotFused("the attention output has no static [B, heads, S, Dv] shape")
    heads = int(qk.inputs[0].shape[1])
    output, output_seq_first = merged_output(pv.outputs[0], outputs)
    return Match(softmax, query, key, value, heads, score_scale * query.scale * key.scale, output, output_seq_first)


# ------------------------------------------------------------------------------------------------ rewriting


def _values(t: gs.Constant) -> np.ndarray:
    """A constant's array, loading graph-surgeon's lazily read large tensors."""
    values = t.values
    return np.asarray(values.load() if hasattr(values, "load") else values)


@dataclass
class Rewrites:
    """What the rewrites of one graph share: channel tensors made per (source, offset), weight columns cut per
    (weight, offset) (the exporter shares identical initializers between blocks), and each new node's origin,
    whose metadata it inherits."""

    made: dict[tuple[str, int], gs.Variable] = field(default_factory=dict)
    cuts: dict[tuple[str, int], gs.Constant] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def cut(self, const: gs.Constant, lo: int, hi: int) -> gs.Constant:
        """Columns lo:hi of a weight (last axis), one constant per weight and range."""
        key = (const.name, lo)
        if key not in self.cuts:
            self.cuts[key] = gs.Constant(f"{const.name}/cols_{lo}_{hi}",
                                         np.ascontiguousarray(_values(const)[..., lo:hi]))
        return self.cuts[key]


def _split_projection(graph: gs.Graph, operand: Operand, rw: Rewrites) -> gs.Variable | None:
    """operand's channels computed by their own MatMul (+ bias Add) with the weight columns cut out, when the
    [B, S, C] tensor is a packed projection x @ W (+ b) with constant W (and b): no copy at run time."""
    src, lo, hi = operand.tensor, operand.offset, operand.offset + operand.width
    node, bias = src.inputs[0] if len(src.inputs) == 1 else None, None
    if node is not None and node.op == "Add":
        made = [i for i in node.inputs if isinstance(i, gs.Variable) and constant(i) is None]
        consts = [i for i in node.inputs if isinstance(i, gs.Constant)]
        if len(made) != 1 or len(consts) != 1 or consts[0].shape is None or list(consts[0].shape) != [src.shape[-1]]:
            return None
        bias, node = consts[0], made[0].inputs[0] if len(made[0].inputs) == 1 else None
    if node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant) \
            or len(node.inputs[1].shape) != 2:
        return None
    weight = node.inputs[1]
    shape = [*src.shape[:-1], operand.width]
    cut = rw.cut(weight, lo, hi)
    out = gs.Variable(f"{src.name}/cols_{lo}_{hi}", dtype=src.dtype, shape=shape)
    graph.nodes.append(gs.Node("MatMul", f"{node.name}/cols_{lo}_{hi}", inputs=[node.inputs[0], cut], outputs=[out]))
    rw.origin[graph.nodes[-1].name] = node.name
    if bias is None:
        return out
    biased = gs.Variable(f"{out.name}/biased", dtype=src.dtype, shape=shape)
    graph.nodes.append(gs.Node("Add", f"{src.inputs[0].name}/cols_{lo}_{hi}", inputs=[out, rw.cut(bias, lo, hi)],
                               outputs=[biased]))
    rw.origin[graph.nodes[-1].name] = src.inputs[0].name
    return biased


def _channels(graph: gs.Graph, operand: Operand, rw: Rewrites) -> gs.Variable:
    """operand as a [B, S, width] tensor: the source itself, its own projection, or a Slice of the source; batch
    first when the source is sequence first."""
    src = operand.tensor
    key = (src.name, operand.offset)
    if key not in rw.made:
        whole = operand.offset == 0 and operand.width == src.shape[-1]
        rw.made[key] = src if whole else _split_projection(graph, operand, rw) or _slice_channels(graph, operand)
    if not operand.seq_first:
        return rw.made[key]
    if (key := (src.name, -1 - operand.offset)) not in rw.made:  # negative offsets: the batch-first copies
        part = rw.made[(src.name, operand.offset)]
        seq, batch, width = part.shape
        rw.made[key] = _relayout(graph, part, gs.Variable(f"{part.name}/batch_first", part.dtype, [batch, seq, width]))
    return rw.made[key]


def _relayout(graph: gs.Graph, t: gs.Variable, out: gs.Variable, swap: bool = True) -> gs.Variable:
    """`out` from `t`: the two leading axes swapped ([S, B, C] <-> [B, S, C]) and/or reshaped; a Reshape (no copy)
    where the memory order stays, i.e. no swap or a swap with a batch of 1."""
    if swap and 1 not in t.shape[:2]:
        graph.nodes.append(gs.Node("Transpose", f"{out.name}/Transpose", attrs={"perm": [1, 0, 2]}, inputs=[t],
                                   outputs=[out]))
    else:
        shape = gs.Constant(f"{out.name}/shape", np.array(out.shape, dtype=np.int64))
        graph.nodes.append(gs.Node("Reshape", f"{out.name}/Reshape", inputs=[t, shape], outputs=[out]))
    return out


def _merge_into(graph: gs.Graph, merged: gs.Variable, match: Match) -> None:
    """The block's own output tensor written from the fused [B, S, C] one, in its layout (sequence first,
    flattened)."""
    batch, seq, width = merged.shape
    target = match.output
    if match.output_seq_first and len(target.shape) == 2:
        merged = _relayout(graph, merged, gs.Variable(f"{merged.name}/seq_first", merged.dtype, [seq, batch, width]))
        _relayout(graph, merged, target, swap=False)
    else:
        _relayout(graph, merged, target, swap=match.output_seq_first)


def _slice_channels(graph: gs.Graph, operand: Operand) -> gs.Variable:
    """operand's channels sliced out of its source at run time: the fallback when the source is not a projection
    with constant weights to cut (one copy of [B, S, width] per operand)."""
    src, lo, hi = operand.tensor, operand.offset, operand.offset + operand.width
    out = gs.Variable(f"{src.name}/slice_{lo}_{hi}", dtype=src.dtype, shape=[*src.shape[:-1], operand.width])
    consts = [gs.Constant(f"{out.name}/{what}", np.array([v], dtype=np.int64)) for what, v in
              (("starts", lo), ("ends", hi), ("axes", -1))]
    graph.nodes.append(gs.Node("Slice", f"{out.name}/Slice", inputs=[src, *consts], outputs=[out]))
    return out


def _rewrite(graph: gs.Graph, match: Match, rw: Rewrites) -> str:
    """One MultiHeadAttention node writing the block's merged output; the old nodes go at cleanup."""
    inputs = [_channels(graph, op, rw) for op in (match.query, match.key, match.value)]
    name = f"{match.softmax.name}/{FUSED_OP}"
    out = match.output
    out.inputs.clear()
    if match.output_seq_first or len(out.shape) != 3:
        out = gs.Variable(f"{name}/output", out.dtype, [*inputs[0].shape[:2], inputs[2].shape[-1]])
        _merge_into(graph, out, match)
    graph.nodes.append(gs.Node(FUSED_OP, name, domain=MS_DOMAIN, inputs=inputs, outputs=[out],
                               attrs={"num_heads": match.heads, "scale": float(match.scale)}))
    rw.origin[name] = match.softmax.name
    return name


def _exported(graph: gs.Graph, model: onnx.ModelProto, origin: dict[str, str]) -> onnx.ModelProto:
    """The graph as ONNX with the source model's IR version and metadata, and each node's metadata (torch's
    name scopes, which is_layer_node and reports read) from the node it is or replaces: graph-surgeon drops it."""
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    metadata = {n.name: n.metadata_props for n in model.graph.node if n.metadata_props}
    for node in out.graph.node:
        props = metadata.get(origin.get(node.name, node.name))
        if props is not None:
            node.metadata_props.extend(props)
    return out


def fuse_attention(model: onnx.ModelProto, name: str | None = None,
                   weights_dir: Path | None = None) -> tuple[onnx.ModelProto, FusionSummary]:
    """`model` with every provable attention block as one com.microsoft MultiHeadAttention node, and what was
    found, fused and left (with reasons). The clustering/reconstruction layers are never touched. Weights left on
    disk are read from `weights_dir` where a projection is cut (passes.optimize has the same rule)."""
    in_layer = is_layer_node(model)
    protos = {n.name: n for n in model.graph.node}
    graph = import_graph(model, weights_dir)
    summary = FusionSummary(name or model.graph.name or "graph")
    outputs = {t.name for t in graph.outputs}
    rw = Rewrites()
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        if in_layer(protos.get(softmax.name, onnx.NodeProto())):
            summary.layer_softmax += 1
            continue
        summary.found += 1
        try:
            match = match_attention(softmax, outputs)
        except NotFused as exc:
            summary.not_fused.append(Unfused(softmax.name, str(exc)))
            continue
        summary.fused.append(_rewrite(graph, match, rw))
    graph.cleanup().toposort()
    out = _exported(graph, model, rw.origin)
    onnx.checker.check_model(without_weights(out))
    return out, summary
