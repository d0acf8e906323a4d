"""The graphs an engine is built from, derived from an export: the graph passes' patched.opt.onnx and the twins
a profile runs instead of the exports (fused attention for ONNX Runtime, fp16). Each is saved, checked and, if
TensorRT may read it, linted for its parser, and reported; ONNX files only, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from hgdeploy.core import progress
from hgdeploy.core.contract import check_model, is_fp32_layer_node, is_layer_node, save_onnx
from hgdeploy.core.files import JsonObject
from hgdeploy.core.memory import release_memory, releases_memory
from hgdeploy.graph.flops import FlopCount, onnx_gflops
from hgdeploy.graph.folder import Engine, ExportFolder, runs_twins, twin_role
from hgdeploy.graph.fp16 import FP32_OPS, Fp16Summary, to_fp16
from hgdeploy.graph.fusion import FusionSummary, fuse_attention
from hgdeploy.graph.lint import DEFAULT_MAJOR, format_finding, lint_model, lint_runtime_model
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
    """One fp16 twin: what the conversion did, and its lint for the runtime that reads it (TensorRT's parser for
    a plain twin, ONNX Runtime for a fused one)."""

    summary: Fp16Summary
    lint_findings: list[str]
    linted_for: str = "tensorrt"

    def to_json(self) -> JsonObject:
        return {**self.summary.to_dict(), "lint_clean": not self.lint_findings,
                "lint_findings": list(self.lint_findings), "linted_for": self.linted_for}


@dataclass(frozen=True)
class Twins:
    """What writing a profile's twins did: the attention fusion of each fused twin, the fp16 conversion of each
    fp16 one (None where the profile runs none)."""

    fusion: dict[str, FusionSummary] | None
    fp16: dict[str, Converted] | None


@releases_memory
def optimize_patched(folder: ExportFolder) -> tuple[ExportFolder, Optimized]:
    """The graph passes on the folder's patched.onnx -> patched.opt.onnx; node counts and GFLOPs before and after,
    and its lint."""
    source = folder.graphs["patched"]
    # weights over 2 GB stay in their file: the passes read the few values they need from it, and the new graph's
    # weights are copied file to file (SAM ViT-H's passes held 10.5 GB when they were loaded and copied twice)
    model = onnx.load(str(source), load_external_data=False)
    with progress.step(f"Optimizing {source.name}: {', '.join(name for name, _ in PASSES)}"):
        out, notes = optimize(model, weights_dir=source.parent)
    counted = (len(model.graph.node), len(out.graph.node), onnx_gflops(model, is_layer_node(model)),
               onnx_gflops(out, is_layer_node(out)))
    del model  # one graph in memory while the result is saved and checked (the checker reads the file again)
    target = save_onnx(out, folder.target("optimized"), weights_dir=source.parent)
    findings = [format_finding(f) for f in lint_model(out, DEFAULT_MAJOR)]
    del out
    release_memory()
    check_model(target)
    return folder.with_graph("optimized", target), Optimized(notes, *counted, target.name, findings)


def write_twins(folder: ExportFolder, engine: Engine,
                roles: tuple[str, ...] = ("baseline", "patched")) -> tuple[ExportFolder, Twins]:
    """The graphs `engine` runs in place of each role's export, when it runs others: the fused twins (every
    attention block one MultiHeadAttention node) for a fused_attention profile, converted to fp16 for an fp16
    one. The patched twin comes from the graph passes' result when there is one."""
    fusion: dict[str, FusionSummary] = {}
    converted: dict[str, Converted] = {}
    for role in roles:
        source = folder.graphs["baseline"] if role == "baseline" else folder.patched_graph()
        if engine.fused_attention:
            twin = twin_role(role, "fp32", True)
            source, fusion[twin] = _fused_graph(source, folder.target(twin))
            folder = folder.with_graph(twin, source)
        if engine.precision == "fp16":
            twin = twin_role(role, "fp16", engine.fused_attention)
            path, converted[twin] = _fp16_graph(source, folder.target(twin), plain=not engine.fused_attention)
            folder = folder.with_graph(twin, path)
    return folder, Twins(fusion or None, converted or None)


def with_twins(folder: ExportFolder, engine: Engine,
               roles: tuple[str, ...] = ("baseline", "patched")) -> ExportFolder:
    """The folder with the twins `engine` runs: those an export for another profile did not write are derived now
    and the manifest updated (fusion and fp16 conversion are graph rewrites, no model needed), so one export
    serves every profile."""
    if not runs_twins(engine):
        return folder
    missing = tuple(role for role in roles if twin_role(role, engine.precision, engine.fused_attention) not in folder.graphs)
    if not missing:
        return folder
    progress.info(f"{folder.path} has no {' or '.join(missing)} graph for {engine.name}: deriving "
                  f"{'them' if len(missing) > 1 else 'it'} from the export")
    folder, _ = write_twins(folder, engine, missing)
    folder.write_manifest()
    return folder


@releases_memory
def _fused_graph(source: Path, target: Path) -> tuple[Path, FusionSummary]:
    """One graph with its attention fused, saved and checked."""
    model = onnx.load(str(source), load_external_data=False)  # weights over 2 GB stay on disk, as in the passes
    with progress.step(f"Fusing attention: {source.name} -> {target.name}"):
        fused, summary = fuse_attention(model, target.name, weights_dir=source.parent)
    del model  # the source and the fused graph each hold the weights: one is enough to save, none to check
    save_onnx(fused, target, weights_dir=source.parent)
    del fused
    release_memory()
    check_model(target)
    return target, summary


@releases_memory
def _fp16_graph(source: Path, target: Path, plain: bool) -> tuple[Path, Converted]:
    """One graph converted to fp16, saved and linted. A plain (TensorRT) graph keeps LayerNorm in an fp32 island;
    a fused (ONNX Runtime) one runs it in fp16 with fp32 statistics inside the op."""
    model = onnx.load(str(source))
    with progress.step(f"Converting {source.name} to {target.name} (fp16, the clustering's distances kept in fp32)"):
        converted, summary = to_fp16(model, is_fp32_layer_node(model), FP32_OPS if plain else frozenset())
    save_onnx(converted, target)
    findings = lint_model(converted, DEFAULT_MAJOR) if plain else lint_runtime_model(converted)
    return target, Converted(summary, [format_finding(f) for f in findings], "tensorrt" if plain else "onnxruntime")
