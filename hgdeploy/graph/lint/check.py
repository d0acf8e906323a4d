"""The lint itself: findings for the model, each node and each tensor, and the entry points
`lint_model` and `lint_path`, with the one-line formatting of a finding.

On top of the parser sits the toolkit's own promise of static shapes (export.py): data-dependent ops
and any tensor with an unknown dimension are findings too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import onnx

from hgdeploy.core.contract import ALWAYS_DATA_DEPENDENT, CONTROL_FLOW
from hgdeploy.core.contract import infer_shapes as contract_infer_shapes
from hgdeploy.core.errors import UserError
from hgdeploy.graph.lint.graph import Graph, bind_function, build_graph, tensor_dims, walk
from hgdeploy.graph.lint.rules import RULES
from hgdeploy.graph.lint.support import DEFAULT_DOMAINS, DEFAULT_MAJOR, MATRIX_TYPES, ParserSupport, support_for

# Per-op type checks only for plain compute types; quantized types go through Q/DQ, UINT8 is I/O-only.
_CHECKED_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"})
# Ops whose Supported Types column describes what they produce (they have no data input).
_TYPED_BY_OUTPUT = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})


@dataclass(frozen=True)
class Finding:
    """One reason the parser (or the toolkit's static-shape rule) would reject the graph.

    op_type is "" for findings about a tensor (node is the tensor's name) or about the whole model
    (node is "" too).
    """

    node: str
    op_type: str
    reason: str


def _node_name(node: onnx.NodeProto) -> str:
    """Nodes without a name are named by their first output."""
    return node.name or (node.output[0] if node.output else "")


def _static(dims: tuple[int | None, ...] | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _type_name(dtype: int) -> str:
    return onnx.TensorProto.DataType.Name(dtype)


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
    listed = ", ".join(short for short, onnx_name in MATRIX_TYPES.items() if onnx_name in allowed)
    return f"{node.op_type} on {dtype} tensors is not supported (the matrix lists {listed})"


def shape_findings(model: onnx.ModelProto) -> list[Finding]:
    """The toolkit's static-shape rule on the graph's named tensors (whatever runtime reads the graph)."""
    graph = model.graph
    out: list[Finding] = []
    seen: set[str] = set()
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in seen:
            continue
        seen.add(vi.name)
        if not vi.type.HasField("tensor_type"):
            out.append(Finding(vi.name, "", f"{vi.type.WhichOneof('value')} values are not supported, only tensors"))
            continue
        dims = tensor_dims(vi.type.tensor_type)
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
    return out


def tensor_findings(model: onnx.ModelProto, g: Graph) -> list[Finding]:
    """Static shapes (the toolkit) and tensor types (the parser) of the graph's named tensors."""
    graph, s = model.graph, g.support
    io = {vi.name for vi in list(graph.input) + list(graph.output)}
    out = shape_findings(model)
    seen: set[str] = set()
    typed = [(vi.name, vi.type.tensor_type.elem_type) for vi in list(graph.input) + list(graph.output)
             + list(graph.value_info) if vi.type.HasField("tensor_type")]
    typed += [(name, g.types[name]) for name in g.constants]
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
    for node in walk(model.graph):
        findings.extend(node_findings(node, g, functions))
    return findings + tensor_findings(model, g)


def load_graph(path: str | Path) -> onnx.ModelProto:
    """An ONNX file's graph, weights left on disk (the rules only read small constants, through
    Graph.value(base_dir)). UserError (one line) if it is missing or not ONNX."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise UserError(f"{path} is not an ONNX model (no IR version or graph)")
    return model


def checker_findings(path: str | Path) -> list[Finding]:
    """onnx's full checker (structure, types, strict shape inference) on the file, as a finding: a graph it rejects
    (a node reading a tensor nothing defines, a wrong type) is broken whatever runtime reads it. The path form
    reads external weights and graphs over 2 GB."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError and protobuf errors
        text = str(e).strip()
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        return [Finding("", "", f"onnx.checker rejects the graph: {first}")]
    return []


def lint_path(path: str | Path, trt_major: int = DEFAULT_MAJOR) -> list[Finding]:
    """onnx's full checker, then lint_model, on an ONNX file. UserError (one line) if it is missing or not ONNX."""
    support = support_for(trt_major)
    model = load_graph(path)
    return checker_findings(path) + _lint(model, support, str(Path(path).parent))


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
