"""The graphs an engine is built from, derived from an export: the graph passes' patched.opt.onnx and the fp16
twins. Each is saved, checked and linted for TensorRT's parser, and reported; ONNX files only, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from hgdeploy.core import progress
from hgdeploy.core.contract import check_model, is_layer_node, save_onnx
from hgdeploy.core.files import JsonObject
from hgdeploy.core.memory import releases_memory
from hgdeploy.graph.flops import FlopCount, onnx_gflops
from hgdeploy.graph.folder import FP16_TWINS, ExportFolder
from hgdeploy.graph.fp16 import Fp16Summary, to_fp16
from hgdeploy.graph.lint import DEFAULT_MAJOR, format_finding, lint_model
from hgdeploy.graph.passes import PASSES, optimize


@dataclass(frozen=True)
class Optimized:
    """What the graph passes did to patched.onnx, and the lint of their result."""

    passes: list[str]
    nodes_before: int
    nodes_after: int
    gflops_before: FlopCount
    gflops_after: FlopCount
    model: str
    lint_findings: list[str]

    def to_json(self) -> JsonObject:
        """report.json's "optimize" and "lint" sections."""
        return {"optimize": {"passes": list(self.passes), "nodes": {"before": self.nodes_before,
                                                                   "after": self.nodes_after},
                             "gflops": {"before": self.gflops_before.to_dict(), "after": self.gflops_after.to_dict()}},
                "lint": {"model": self.model, "trt_major": DEFAULT_MAJOR, "clean": not self.lint_findings,
                         "findings": list(self.lint_findings)}}


@dataclass(frozen=True)
class Converted:
    """One fp16 twin: what the conversion did, and its lint."""

    summary: Fp16Summary
    lint_findings: list[str]

    def to_json(self) -> JsonObject:
        return {**self.summary.to_dict(), "lint_clean": not self.lint_findings,
                "lint_findings": list(self.lint_findings)}


@releases_memory
def optimize_patched(folder: ExportFolder) -> tuple[ExportFolder, Optimized]:
    """The graph passes on the folder's patched.onnx -> patched.opt.onnx; node counts and GFLOPs before and after,
    and its lint."""
    source = folder.graphs["patched"]
    model = onnx.load(str(source))  # with its external weights, if it has them
    with progress.step(f"Optimizing {source.name}: {', '.join(name for name, _ in PASSES)}"):
        out, notes = optimize(model)
    target = save_onnx(out, folder.target("optimized"))
    check_model(target)
    findings = [format_finding(f) for f in lint_model(out, DEFAULT_MAJOR)]
    return folder.with_graph("optimized", target), Optimized(
        notes, len(model.graph.node), len(out.graph.node), onnx_gflops(model, is_layer_node(model)),
        onnx_gflops(out, is_layer_node(out)), target.name, findings)


def write_fp16(folder: ExportFolder, roles: tuple[str, ...] = ("baseline", "patched")) -> tuple[ExportFolder,
                                                                                               dict[str, Converted]]:
    """The fp16 twin of each role (the patched one from the optimized graph when there is one): fp16 weights and
    compute, fp32 inputs/outputs, the clustering layers and LayerNorm in fp32; each type-checked and linted.
    Returns the folder and each twin's conversion, by its role (baseline_fp16, patched_fp16)."""
    converted: dict[str, Converted] = {}
    sources = {"baseline": folder.graphs.get("baseline"), "patched": folder.patched_graph()}
    for role in roles:
        twin = FP16_TWINS[role]
        path, converted[twin] = _fp16_graph(sources[role], folder.target(twin))
        folder = folder.with_graph(twin, path)
    return folder, converted


@releases_memory
def _fp16_graph(source: Path, target: Path) -> tuple[Path, Converted]:
    """One graph converted to fp16, saved and linted."""
    model = onnx.load(str(source))
    with progress.step(f"Converting {source.name} to {target.name} (fp16, clustering kept in fp32)"):
        converted, summary = to_fp16(model, is_layer_node(model))
    save_onnx(converted, target)
    return target, Converted(summary, [format_finding(f) for f in lint_model(converted, DEFAULT_MAJOR)])
