"""Will TensorRT's ONNX parser take this graph? Answered from the graph alone: no GPU, no TensorRT.

`check` holds the whole lint for now; `lint_model` and `lint_path` are the entry points.
"""

from __future__ import annotations

from hgdeploy.graph.lint.check import (
    DEFAULT_DOMAINS, DEFAULT_MAJOR, RULES, SUPPORT, SUPPORTED_MAJORS, TOPK_MAX_K, Finding, Graph, OpSupport,
    ParserSupport, Rule, bind_function, build_graph, constant_attributes, constant_input, dropout_training,
    einsum_equation, format_finding, format_findings, grid_sample_rank, infer_shapes, instance_norm_inputs,
    layer_norm_outputs, lint_model, lint_path, model_findings, node_findings, op_type_reason, pool_shape,
    resize_attributes, resize_axes, scatter_elements_reduction, scatter_nd_reduction, support_for,
    tensor_findings, topk_k, topk_sorted, zero_point,
)

__all__ = [
    "DEFAULT_DOMAINS", "DEFAULT_MAJOR", "RULES", "SUPPORT", "SUPPORTED_MAJORS", "TOPK_MAX_K", "Finding", "Graph",
    "OpSupport", "ParserSupport", "Rule", "bind_function", "build_graph", "constant_attributes", "constant_input",
    "dropout_training", "einsum_equation", "format_finding", "format_findings", "grid_sample_rank", "infer_shapes",
    "instance_norm_inputs", "layer_norm_outputs", "lint_model", "lint_path", "model_findings", "node_findings",
    "op_type_reason", "pool_shape", "resize_attributes", "resize_axes", "scatter_elements_reduction",
    "scatter_nd_reduction", "support_for", "tensor_findings", "topk_k", "topk_sorted", "zero_point",
]
