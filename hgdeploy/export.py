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

import torch
from torch import nn

from hgdeploy.contract import CLUSTERING_METADATA, EXPORT_METADATA, INPUT_NAME, check_model
from hgdeploy.layers import TokenClustering, TokenReconstruction

OPSET = 18
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...],
                info: dict | None = None) -> Path:
    """Export `model` at `example`'s shape to `path` (written atomically), check it, return the path.

    info: what the export was made from (recipe values, plan), recorded in the model's metadata.
    """
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
            if info is not None:
                program.model.metadata_props[EXPORT_METADATA] = json.dumps(info)
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
            specs.append({"scope": name, "kind": "clustering", **mod.spec, "form_reason": mod.form_reason})
        elif isinstance(mod, TokenReconstruction):
            specs.append({"scope": name, "kind": "reconstruction", "k": mod.k, "variant": mod.variant})
    return specs


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
