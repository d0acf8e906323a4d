"""PyTorch -> ONNX at a fixed input shape, then checked: onnx.checker, shape inference, static shapes.

The exported graph takes the preprocessed float32 NCHW tensor; resizing and normalisation stay
in the tool (and are recorded in the recipe/report).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from hgdeploy.core.contract import (BATCH_AXIS, CLUSTERING_METADATA, EXPORT_METADATA, EXTERNAL_DATA_BYTES, INPUT_NAME,
                                    check_model)
from hgdeploy.core.recipe import MAX_BATCH
from hgdeploy.core.files import staged_file
from hgdeploy.core.memory import release_memory
from hgdeploy.layers import TokenClustering, TokenReconstruction, WindowTokenClustering, WindowTokenReconstruction

OPSET = 18


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...],
                info: dict | None = None, external_data: bool | None = None, dynamic_batch: bool = False) -> Path:
    """Export `model` at `example`'s shape to `path` (written atomically), check it, return the path.

    info: what the export was made from (recipe values, plan), recorded in the model's metadata.
    dynamic_batch: the first axis of the input and outputs is BATCH_AXIS, any batch (the example's must be >= 2).
    external_data: weights in `<path>.data` beside the graph; None: from EXTERNAL_DATA_BYTES of weights on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = external_data if external_data is not None else weight_bytes(model) >= EXTERNAL_DATA_BYTES
    with staged_file(path) as tmp:  # under its final name: external data files are referenced by name
        _export_and_save(model, example, tmp, output_names, info, big, dynamic_batch)
        forget_rewriter_matches()
        release_memory()  # the exported program (and the weights its optimizer folded) is gone before the check
        check_model(tmp)
    return path


def forget_rewriter_matches() -> None:
    """Drop the graph onnxscript's rewrite rules keep from their last match. The rules are module-level objects
    whose matchers hold `_graph` (the exported model, its initializers wrapping our torch weights) until the next
    export: after `torch.onnx.export(..., optimize=True)` every weight of the model stayed alive after the model
    itself was freed (SAM ViT-H: 2.4 GB, through the timing step of `hgdeploy run`). onnxscript has no reset."""
    import sys

    from onnxscript.rewriter import RewriteRule, RewriteRuleSet

    for name, module in list(sys.modules.items()):
        if not name.startswith("onnxscript.rewriter") or module is None:
            continue
        for value in list(vars(module).values()):
            rules = value.rules if isinstance(value, RewriteRuleSet) else [value] if isinstance(value, RewriteRule) else []
            for rule in rules:
                matcher = getattr(rule, "_matcher", None)
                for attr in ("_graph", "_match", "_current_node"):
                    if matcher is not None and getattr(matcher, attr, None) is not None:
                        setattr(matcher, attr, None)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _export_and_save(model: nn.Module, example: torch.Tensor, target: Path, output_names: tuple[str, ...],
                     info: dict | None, external_data: bool, dynamic_batch: bool = False) -> None:
    """torch.onnx.export (dynamo) with our metadata, saved to `target`; nothing of it outlives the call."""
    dynamic = ({0: torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)},) if dynamic_batch else None
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=list(output_names), external_data=external_data, optimize=True, verbose=False,
            dynamic_shapes=dynamic,
        )
        specs = clustering_specs(model)
        if specs:
            program.model.metadata_props[CLUSTERING_METADATA] = json.dumps(specs)
        if info is not None:
            program.model.metadata_props[EXPORT_METADATA] = json.dumps(info)
        program.save(str(target), external_data=external_data)


def clustering_specs(model: nn.Module) -> list[dict]:
    """One entry per clustering or reconstruction layer: its module path ("scope"), kind and constants."""
    specs = []
    for name, mod in model.named_modules():
        if isinstance(mod, TokenClustering):
            specs.append({"scope": name, "kind": "clustering", **mod.spec, "form_reason": mod.form_reason})
        elif isinstance(mod, TokenReconstruction):
            specs.append({"scope": name, "kind": "reconstruction", "k": mod.k, "variant": mod.variant,
                          "candidates": mod.candidates})
        elif isinstance(mod, (WindowTokenClustering, WindowTokenReconstruction)):
            # the window partition, padding and crop around the plain layers: fp32 with them, as the authors
            # run window clustering and reconstruction outside autocast
            kind = "window_clustering" if isinstance(mod, WindowTokenClustering) else "window_reconstruction"
            specs.append({"scope": name, "kind": kind, "size": list(mod.size), "window": mod.window,
                          "cluster_window": mod.cluster_window})
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
