"""PyTorch -> ONNX at a fixed input shape, then checked: onnx.checker, shape inference, static shapes.

The exported graph takes the preprocessed float32 NCHW tensor; resizing and normalisation stay
in the tool (and are recorded in the recipe/report).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from hgdeploy.layers import TokenClustering, TokenReconstruction

OPSET = 18
# Model metadata key holding, per clustering layer, its module path and constants, so graph passes
# can find the subgraph (the exporter records module paths as node name scopes) and rebuild it.
CLUSTERING_METADATA = "hgdeploy.clustering"
INPUT_NAME = "pixel_values"
# Ops whose output shape depends on data; the toolkit promises static shapes.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Loop", "If", "Scan", "NonMaxSuppression", "Compress"})
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin


class ExportError(RuntimeError):
    """The exported graph breaks a promise of the toolkit (dynamic shapes, failing checker)."""


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...]) -> Path:
    """Export `model` at `example`'s shape to `path` (written atomically), check it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    # Saved under its final name in a staging folder: external data files are referenced by name.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    tmp = staging / path.name
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                model.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=list(output_names), external_data=big, optimize=True, verbose=False,
            )
            specs = clustering_specs(model)
            if specs:
                program.model.metadata_props[CLUSTERING_METADATA] = json.dumps(specs)
            program.save(str(tmp), external_data=big)
        check_model(tmp)
        for item in sorted(staging.iterdir(), key=lambda f: f.name == path.name):  # the graph last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def clustering_specs(model: nn.Module) -> list[dict]:
    """One entry per clustering or reconstruction layer: its module path ("scope"), kind and constants."""
    specs = []
    for name, mod in model.named_modules():
        if isinstance(mod, TokenClustering):
            specs.append({"scope": name, "kind": "clustering", **mod.spec})
        elif isinstance(mod, TokenReconstruction):
            specs.append({"scope": name, "kind": "reconstruction", "k": mod.k, "variant": mod.variant})
    return specs


def read_clustering_specs(model: onnx.ModelProto) -> list[dict]:
    for prop in model.metadata_props:
        if prop.key == CLUSTERING_METADATA:
            return json.loads(prop.value)
    return []


@contextlib.contextmanager
def quiet_exporter():
    """The dynamo exporter prints progress lines and warnings we do not want in a CLI's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_model(path: Path) -> onnx.ModelProto:
    """onnx.checker, strict shape inference, and the static-shape rule. Raises ExportError."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), check_type=True, strict_mode=True, data_prop=True)
    problems = static_shape_problems(model)
    if problems:
        raise ExportError(f"{path.name} is not static: " + "; ".join(problems[:5]))
    return model


def static_shape_problems(model: onnx.ModelProto) -> list[str]:
    """Why the graph is not fully static, one string per problem (empty when it is)."""
    g = model.graph
    problems = [f"{n.op_type} node {n.name or '?'} has a data-dependent shape" for n in g.node if n.op_type in DATA_DEPENDENT_OPS]
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for n in g.node:
        if n.op_type == "TopK" and n.input[1] not in constants:
            problems.append(f"TopK node {n.name or '?'} has a runtime-computed k")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            problems.append(f"tensor {vi.name} has an unknown dimension")
    return problems
