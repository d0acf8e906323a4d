"""The graphs an engine is built from, derived from an export: the graph passes' patched.opt.onnx and the fp16
twins. Each is saved, checked and linted for TensorRT's parser, and reported; ONNX files only, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from hgdeploy.core import progress
from hgdeploy.core.contract import check_model, is_layer_node, save_onnx
from hgdeploy.core.memory import releases_memory
from hgdeploy.graph.flops import onnx_gflops
from hgdeploy.graph.folder import FP16_TWINS, ExportFolder
from hgdeploy.graph.fp16 import to_fp16
from hgdeploy.graph.lint import DEFAULT_MAJOR, format_finding, lint_model
from hgdeploy.graph.passes import PASSES, optimize


@releases_memory
def optimize_patched(folder: ExportFolder) -> tuple[ExportFolder, dict[str, Any]]:
    """The graph passes on the folder's patched.onnx -> patched.opt.onnx; node counts and GFLOPs before and after,
    and its lint."""
    source = folder.graphs["patched"]
    model = onnx.load(str(source))  # with its external weights, if it has them
    with progress.step(f"Optimizing {source.name}: {', '.join(name for name, _ in PASSES)}"):
        out, notes = optimize(model)
    target = save_onnx(out, folder.target("optimized"))
    check_model(target)
    before, after = onnx_gflops(model, is_layer_node(model)), onnx_gflops(out, is_layer_node(out))
    findings = lint_model(out, DEFAULT_MAJOR)
    return folder.with_graph("optimized", target), {
        "optimize": {"passes": notes, "nodes": {"before": len(model.graph.node), "after": len(out.graph.node)},
                     "gflops": {"before": before.to_dict(), "after": after.to_dict()}},
        "lint": {"model": target.name, "trt_major": DEFAULT_MAJOR, "clean": not findings,
                 "findings": [format_finding(f) for f in findings]}}


def write_fp16(folder: ExportFolder, roles: tuple[str, ...] = ("baseline", "patched")) -> tuple[ExportFolder,
                                                                                               dict[str, Any]]:
    """The fp16 twin of each role (the patched one from the optimized graph when there is one): fp16 weights and
    compute, fp32 inputs/outputs, the clustering layers and LayerNorm in fp32; each type-checked and linted."""
    report: dict[str, Any] = {}
    sources = {"baseline": folder.graphs.get("baseline"), "patched": folder.patched_graph()}
    for role in roles:
        twin = FP16_TWINS[role]
        path, report[twin] = _fp16_graph(sources[role], folder.target(twin))
        folder = folder.with_graph(twin, path)
    return folder, {"fp16": report}


@releases_memory
def _fp16_graph(source: Path, target: Path) -> tuple[Path, dict[str, Any]]:
    """One graph converted to fp16, saved and linted; its summary and lint findings."""
    model = onnx.load(str(source))
    with progress.step(f"Converting {source.name} to {target.name} (fp16, clustering kept in fp32)"):
        converted, summary = to_fp16(model, is_layer_node(model))
    save_onnx(converted, target)
    findings = lint_model(converted, DEFAULT_MAJOR)
    return target, summary.to_dict() | {"lint_clean": not findings,
                                        "lint_findings": [format_finding(f) for f in findings]}
