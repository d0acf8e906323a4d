"""What the rules see of the graph: constants, types and shapes by tensor name, gathered from the graph
and its If/Loop/Scan bodies (`build_graph`) or bound into a local function (`bind_function`), and the
nodes in the order the parser imports them (`walk`).

Its own module because both the op rules and the checks read the model through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx
from onnx import numpy_helper

from hgdeploy.graph.lint.support import DEFAULT_DOMAINS, ParserSupport


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


def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, each followed by the nodes of its bodies (the parser imports those too)."""
    for node in graph.node:
        yield node
        for body in _subgraphs(node):
            yield from walk(body)


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


def tensor_dims(t: onnx.TypeProto.Tensor) -> tuple[int | None, ...] | None:
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
                dims = tensor_dims(vi.type.tensor_type)
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
