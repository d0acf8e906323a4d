"""The graph contract: what an export writes into an ONNX file and the deploy side reads back.

Export (torch), the graph passes, lint and the backends (no torch) all speak it, so it lives
here, with nothing heavier than onnx: the input name, the clustering layers' metadata, the
node-name marker for layers kept in fp32, and the static-shape rule.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from hgdeploy.core.files import file_sha256, staged_file

INPUT_NAME = "pixel_values"
# The name of a dynamic batch axis (model.batch = "dynamic"): the first dimension of the input and every output.
BATCH_AXIS = "batch"
# What an output is, so checks know how to compare it: "tokens" [B, N, C]; "heatmap" [B, 1, H, W]
# probabilities in [0, 1]; "segmentation" [B, K, H, W] class logits; "depth" [B, H, W];
# "classification" [B, ..., K] class logits (per image, or per query); "features" [B, C, H, W] maps a later
# model reads (backbone stages, SAM's image embeddings, Mask2Former's per-query mask logits).
# A family names each output's kind; fidelity metrics and engine profiles' parity bounds
# (parity.max_abs_per_kind) are stated per kind, so that one profile fits every model.
OUTPUT_KINDS = ("tokens", "heatmap", "segmentation", "depth", "classification", "features")
# Model metadata key holding, per clustering/reconstruction layer, its module path ("scope"), kind and
# constants, so the passes find the subgraph (the exporter records module paths as node name scopes).
CLUSTERING_METADATA = "hgdeploy.clustering"
# Model metadata key holding what an export was made from (recipe values, plan, preprocessing), so the
# deploy side can describe a graph and refuse to check it against another plan.
EXPORT_METADATA = "hgdeploy.patch.export"
# Node metadata key under which torch's exporter records the module path(s) a node came from.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Node-name prefixes the graph passes give the clustering/reconstruction layers' nodes (passes.mark_precision):
# those a reduced-precision engine must keep in fp32, and those of the layers' fp16-safe weighted sums.
FP32_MARKER = "hgdeploy_fp32"
FP16_MARKER = "hgdeploy_fp16"
LAYER_MARKERS = (FP32_MARKER, FP16_MARKER)
# Name prefix of the layers' submodules that are safe in fp16 (layers.mixing.WeightedSum): their nodes run in
# fp16 in an fp16 graph although they sit inside a clustering/reconstruction layer.
FP16_SAFE_PREFIX = "fp16_"
# Ops whose output shape depends on values; the toolkit promises static shapes. Loop/If/Scan are
# data-dependent only when an output has no static shape.
ALWAYS_DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})
CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})
DATA_DEPENDENT_OPS = ALWAYS_DATA_DEPENDENT | CONTROL_FLOW
# protobuf cannot serialise a message over 2 GiB: a graph whose tensors pass this (the limit, with margin for
# the graph itself) keeps them in `<file>.data` beside the file, as ONNX's external data.
INLINE_LIMIT_BYTES = 1_800_000_000
# From these weights on an export keeps them in `<file>.data` even below protobuf's limit: saving them inline
# serialises every weight into one message, which held three copies at once (DPT-Large's export at its [ci] shape
# peaked at 6.0 GB inline, 2.2 GB with external data: the exporter writes the file tensor by tensor, and the passes
# and the fusion then copy the weights file to file). ONNX Runtime's lean sessions (backends.onnxrt.LEAN_GRAPH_BYTES)
# and `run`'s fresh processes take this line too: the models whose graphs count in GB.
EXTERNAL_DATA_BYTES = 256 << 20
# Tensors below this stay inside the graph even then: shapes, axes and scales the checks and lint read.
EXTERNAL_MIN_BYTES = 1024


class ExportError(RuntimeError):
    """A graph breaks a promise of the toolkit (dynamic shapes, failing checker, missing layer)."""


def read_clustering_specs(model: onnx.ModelProto) -> list[dict]:
    """The clustering/reconstruction layers recorded at export ([] for a graph without them)."""
    for prop in model.metadata_props:
        if prop.key == CLUSTERING_METADATA:
            return json.loads(prop.value)
    return []


def read_export_info(model: onnx.ModelProto) -> dict | None:
    """What the export recorded about its recipe and plan (None for graphs from elsewhere)."""
    for prop in model.metadata_props:
        if prop.key == EXPORT_METADATA:
            return json.loads(prop.value)
    return None


def write_clustering_specs(model: onnx.ModelProto, specs: list[dict]) -> None:
    """Record (or replace) the layers' specs in the model metadata."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != CLUSTERING_METADATA]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    if specs:
        model.metadata_props.add(key=CLUSTERING_METADATA, value=json.dumps(specs))


def node_scopes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name -> module paths it was exported from (empty when the exporter recorded none)."""
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == NAME_SCOPES:
                out[node.name] = ast.literal_eval(prop.value)
    return out


def is_layer_node(model: onnx.ModelProto) -> Callable[[onnx.NodeProto], bool]:
    """Predicate: does a node belong to a clustering/reconstruction layer (before or after the passes)?"""
    scopes = node_scopes(model)
    layer_scopes = [s["scope"] for s in read_clustering_specs(model)]
    return lambda n: n.name.startswith(LAYER_MARKERS) or any(s in scopes.get(n.name, ()) for s in layer_scopes)


def in_fp16_safe_scope(scopes: list[str] | tuple[str, ...]) -> bool:
    """Was a node exported from one of the layers' fp16-safe submodules (a module path ending in FP16_SAFE_PREFIX...)?"""
    return any(s.rsplit(".", 1)[-1].startswith(FP16_SAFE_PREFIX) for s in scopes)


def is_fp32_layer_node(model: onnx.ModelProto) -> Callable[[onnx.NodeProto], bool]:
    """Predicate: does a node compute in fp32 in an fp16 graph? The layers' nodes do (marked by the passes, or by
    their scope before them), except those of their fp16-safe submodules."""
    scopes = node_scopes(model)
    in_layer = is_layer_node(model)
    return lambda n: n.name.startswith(FP32_MARKER) or (
        in_layer(n) and not n.name.startswith(FP16_MARKER) and not in_fp16_safe_scope(scopes.get(n.name, ())))


def has_batch_axis(model: onnx.ModelProto) -> bool:
    """Does the graph take a dynamic batch (its input's first dimension is BATCH_AXIS)?"""
    dims = next((i.type.tensor_type.shape.dim for i in model.graph.input if i.name == INPUT_NAME), [])
    return len(dims) > 0 and dims[0].dim_param == BATCH_AXIS


def static_shape_problems(model: onnx.ModelProto) -> list[str]:
    """Why the graph is not static, one string per problem (empty when it is). In a graph with a batch axis
    (has_batch_axis) the input is the one dynamic thing, so any unknown dimension inside is a function of the batch
    (its multiples, a permuted batch axis): only the input's and outputs' dimensions after the first must be
    static, and every output must name its first BATCH_AXIS."""
    g = model.graph
    batched = has_batch_axis(model)
    problems = [f"{n.op_type} node {n.name or '?'} has a data-dependent shape" for n in g.node
                if n.op_type in DATA_DEPENDENT_OPS]
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for n in g.node:
        if n.op_type == "TopK" and n.input[1] not in constants:
            problems.append(f"TopK node {n.name or '?'} has a runtime-computed k")
    for vi in list(g.input) + list(g.output) + ([] if batched else list(g.value_info)):
        t = vi.type.tensor_type
        free = 1 if batched else 0  # leading dimensions that may be symbolic
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim[free:]):
            problems.append(f"tensor {vi.name} has an unknown dimension")
    if batched:
        problems += [f"output {o.name} has no {BATCH_AXIS} axis first" for o in g.output
                     if o.type.tensor_type.shape.dim[0].dim_param != BATCH_AXIS]
    return problems


def check_model(path: Path) -> onnx.ModelProto:
    """onnx.checker, strict shape and type inference, and the static-shape rule; ExportError naming the problem.

    Returns the graph with inferred shapes but without its large weights (shapes_of): checking a ViT-L does
    not hold several copies of its gigabytes.
    """
    onnx.checker.check_model(str(path))  # reads the file itself; structure, attributes, opsets
    try:
        model = shapes_of(onnx.load(str(path), load_external_data=False), check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ExportError(f"{Path(path).name} does not type-check: {str(exc).splitlines()[0]}") from exc
    problems = static_shape_problems(model)
    if problems:
        raise ExportError(f"{Path(path).name} is not static: " + "; ".join(problems[:5]))
    return model


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, tensor attributes (Constant's value), subgraphs' too. onnx
    has this walk only as a private helper (external_data_helper._get_all_tensors)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor the graph holds (initializers, Constant attributes, subgraphs), from their shapes:
    reading the protos' data would copy gigabytes."""
    return sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in all_tensors(model.graph))


def save_onnx(model: onnx.ModelProto, path: Path, weights_dir: Path | None = None) -> Path:
    """Write `model` to `path` atomically, with its weights in `<path>.data` when protobuf's 2 GB limit forces it
    (onnx's external data; a stale `.data` from an earlier, larger graph is removed).

    Saving with external data moves the weights out of `model`: its large tensors then refer to the file. A model
    loaded with its weights left on disk (onnx.load(..., load_external_data=False)) keeps them there: each tensor
    is copied from its file under `weights_dir` into `<path>.data`, a chunk at a time, so saving a ViT-H's graph
    never holds its 2.4 GB in memory.
    """
    path, data = Path(path), external_data_file(path)
    on_disk, big = [], []  # weights still in a file; large tensors in memory (a pass made them)
    for tensor in all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if any(entry.key == "location" for entry in tensor.external_data):
                on_disk.append(tensor)
                continue
            tensor.data_location = onnx.TensorProto.DEFAULT  # graph-surgeon re-made it from values a pass read
        if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            big.append(tensor)
    external = bool(on_disk) or tensor_bytes(model) > INLINE_LIMIT_BYTES
    with staged_file(path) as tmp:
        if on_disk:
            copy_external_data(on_disk, Path(weights_dir or path.parent), tmp.with_name(data.name), big)
            tmp.write_bytes(model.SerializeToString())
        elif external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=EXTERNAL_MIN_BYTES)
        else:
            tmp.write_bytes(model.SerializeToString())
    if not external:
        data.unlink(missing_ok=True)
    return path


EXTERNAL_ALIGN = 4096  # each tensor starts on a page in a .data file we write (ONNX Runtime can map it)
COPY_CHUNK = 64 << 20


def copy_external_data(tensors: list[onnx.TensorProto], source_dir: Path, data: Path,
                       inline: list[onnx.TensorProto] = ()) -> None:
    """Copy each tensor's external bytes (its `location` under `source_dir`) into the file `data`, a chunk at a
    time, and point the tensor there; move the `inline` tensors' raw bytes there too. onnx has no such copy: its
    savers read every tensor into memory first."""
    def start(tensor: onnx.TensorProto, length: int) -> None:  # the tensor's bytes go next, page-aligned
        out.write(b"\0" * (-out.tell() % EXTERNAL_ALIGN))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", data.name), ("offset", str(out.tell())), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)

    with open(data, "wb") as out:
        for tensor in inline:
            start(tensor, len(tensor.raw_data))
            out.write(tensor.raw_data)
            tensor.ClearField("raw_data")
        for tensor in tensors:
            info = {entry.key: entry.value for entry in tensor.external_data}
            length = int(info["length"]) if "length" in info else (
                math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
            start(tensor, length)
            with open(source_dir / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                left = length
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise ExportError(f"{info['location']} ends before the weights of {tensor.name}")
                    out.write(chunk)
                    left -= len(chunk)


def external_data_file(path: Path) -> Path:
    """Where a graph over 2 GB keeps its weights: `<file>.data` beside it (save_onnx; torch's exporter too)."""
    return Path(path).with_name(Path(path).name + ".data")


def graph_files(path: Path) -> list[Path]:
    """The files an ONNX graph is: itself and, when it keeps its weights beside it, external_data_file."""
    data = external_data_file(path)
    return [Path(path), data] if data.exists() else [Path(path)]


def graph_sha256(path: Path) -> str:
    """sha256 of a graph with its weights: a new checkpoint of a ViT-H changes only its `.data` file."""
    return file_sha256(*graph_files(path))


# Initializers of more elements are weights; smaller ones are constants shape inference may need to read.
WEIGHT_ELEMENTS = 256


def _is_weight(init: onnx.TensorProto) -> bool:
    """By element count: the proto's ByteSize walks the tensor (4 s over ViT-L's initializers)."""
    return init.data_location == onnx.TensorProto.EXTERNAL or math.prod(init.dims) > WEIGHT_ELEMENTS


def _copy_field(target: Message, field: FieldDescriptor, value: object) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large initializers are graph inputs of their type and shape (the weights are
    not copied): what shape inference needs, at a fraction of the size."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
    inputs = {i.name for i in model.graph.input}  # older exporters list initializers as inputs too
    for init in model.graph.initializer:
        if not _is_weight(init):
            light.graph.initializer.append(init)
        elif init.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def shapes_of(model: onnx.ModelProto, **options: bool) -> onnx.ModelProto:
    """onnx's shape inference (with data propagation) on the model without its weights: the graph with every
    inferred shape, for checks that read shapes. Inference serialises the whole model to C++ and parses its
    answer back; with ViT-L's 1.2 GB of weights that took 17 s a call."""
    return onnx.shape_inference.infer_shapes(without_weights(model), data_prop=True, **options)


def infer_shapes(model: onnx.ModelProto, **options: bool) -> onnx.ModelProto:
    """What onnx.shape_inference.infer_shapes(model, data_prop=True) returns (the whole model with inferred
    shapes), inferred without the weights (shapes_of) and given them back: one copy instead of four passes."""
    inferred = shapes_of(model, **options)
    g = inferred.graph
    del g.input[:]
    g.input.extend(model.graph.input)
    del g.initializer[:]
    g.initializer.extend(model.graph.initializer)
    return inferred
