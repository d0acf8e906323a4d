"""Will TensorRT's ONNX parser take this graph? Answered from the graph alone: no GPU, no TensorRT.

`support` holds the parser's support matrix per TensorRT major, `graph` what the rules see of the model,
`rules` the per-op restrictions, and `check` the findings with the entry points `lint_model` and
`lint_path`; `runtime` lints the graphs only ONNX Runtime reads (the fused twins). Every public name is re-exported here, so callers import from `hgdeploy.graph.lint`.
"""

from __future__ import annotations

from hgdeploy.graph.lint.check import (
    Finding,
    format_finding,
    format_findings,
    infer_shapes,
    lint_model,
    lint_path,
    model_findings,
    node_findings,
    op_type_reason,
    shape_findings,
    tensor_findings,
)
from hgdeploy.graph.lint.graph import Graph, bind_function, build_graph
from hgdeploy.graph.lint.runtime import lint_runtime_model, lint_runtime_path
from hgdeploy.graph.lint.rules import (
    RULES,
    TOPK_MAX_K,
    Rule,
    constant_attributes,
    constant_input,
    dropout_training,
    einsum_equation,
    grid_sample_rank,
    instance_norm_inputs,
    layer_norm_outputs,
    pool_shape,
    resize_attributes,
    resize_axes,
    scatter_elements_reduction,
    scatter_nd_reduction,
    topk_k,
    topk_sorted,
    zero_point,
)
from hgdeploy.graph.lint.support import (
    DEFAULT_DOMAINS,
    DEFAULT_MAJOR,
    SUPPORT,
    SUPPORTED_MAJORS,
    OpSupport,
    ParserSupport,
    support_for,
)

__all__ = [
    "DEFAULT_DOMAINS", "DEFAULT_MAJOR", "RULES", "SUPPORT", "SUPPORTED_MAJORS", "TOPK_MAX_K", "Finding", "Graph",
    "OpSupport", "ParserSupport", "Rule", "bind_function", "build_graph", "constant_attributes", "constant_input",
    "dropout_training", "einsum_equation", "format_finding", "format_findings", "grid_sample_rank", "infer_shapes",
    "instance_norm_inputs", "layer_norm_outputs", "lint_model", "lint_path", "lint_runtime_model",
    "lint_runtime_path", "model_findings", "node_findings",
    "op_type_reason", "pool_shape", "resize_attributes", "resize_axes", "scatter_elements_reduction",
    "scatter_nd_reduction", "shape_findings", "support_for", "tensor_findings", "topk_k", "topk_sorted", "zero_point",
]
