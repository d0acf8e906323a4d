"""The lint of a graph ONNX Runtime runs and TensorRT never reads: the fused twins, whose attention is one
com.microsoft MultiHeadAttention node (TensorRT's parser takes no com.microsoft op; its builder fuses attention
itself, so TensorRT profiles run the plain graphs, which `check.lint_model` lints).

Answered from the graph and the installed onnxruntime's operator schemas: every node is an op that ONNX
Runtime knows, at the opset the graph imports, and every tensor has a static shape (the toolkit's rule).
Whether a given provider has a kernel for it shows when its session is built.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import onnx

from hgdeploy.graph.lint.check import Finding, checker_findings, infer_shapes, load_graph, shape_findings


@lru_cache(maxsize=1)
def ort_schemas() -> dict[tuple[str, str], list[int]]:
    """(domain, op) -> the opset versions its schemas start at, for the installed onnxruntime."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    versions: dict[tuple[str, str], list[int]] = {}
    for schema in ort_state.get_all_operator_schema():
        domain = "" if schema.domain == "ai.onnx" else schema.domain
        versions.setdefault((domain, schema.name), []).append(schema.since_version)
    return versions


def node_reason(node: onnx.NodeProto, opsets: dict[str, int]) -> str | None:
    """Why ONNX Runtime would not know `node`, or None."""
    import onnxruntime

    domain = "" if node.domain == "ai.onnx" else node.domain
    since = ort_schemas().get((domain, node.op_type))
    where = f"{domain}::{node.op_type}" if domain else node.op_type
    if since is None:
        return f"ONNX Runtime {onnxruntime.__version__} has no op {where}"
    if min(since) > opsets.get(domain, 1):
        return f"{where} exists in ONNX Runtime from opset {min(since)}; the graph imports {opsets.get(domain)}"
    return None


def lint_runtime_model(model: onnx.ModelProto) -> list[Finding]:
    """Why ONNX Runtime would refuse `model` (or the static-shape rule would); empty when nothing would."""
    model, findings = infer_shapes(model)
    opsets = {("" if i.domain == "ai.onnx" else i.domain): i.version for i in model.opset_import}
    for node in model.graph.node:
        reason = node_reason(node, opsets)
        if reason:
            findings.append(Finding(node.name, node.op_type, reason))
    return findings + shape_findings(model)


def lint_runtime_path(path: str | Path) -> list[Finding]:
    """onnx's full checker, then lint_runtime_model, on an ONNX file. UserError (one line) if it is missing or not
    ONNX."""
    model = load_graph(path)
    return checker_findings(path) + lint_runtime_model(model)
