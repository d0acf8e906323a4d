"""The one road from loaded PyTorch models to a deployable export folder: export -> graph passes -> the profile's
twins (fused attention, fp16) -> manifest.

Every command that writes graphs from models takes it (run, export, bench and eval without an export folder,
tune for each plan it times); the deploy-side commands only read what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hgdeploy.backends import EngineProfile
from hgdeploy.core import progress
from hgdeploy.core.files import JsonObject
from hgdeploy.graph.deploy import optimize_patched, write_twins
from hgdeploy.graph.folder import ExportFolder, runs_twins
from hgdeploy.measure.results import Report
from hgdeploy.patch.export import OPSET, export_onnx
from hgdeploy.patch.models import Models

BOTH = ("baseline", "patched")


def write_deployable(models: Models, example: torch.Tensor, engine: EngineProfile, folder: Path,
                     info: JsonObject | None = None, roles: tuple[str, ...] = BOTH,
                     passes: bool = True, dynamic_batch: bool = False) -> tuple[ExportFolder, Report]:
    """`roles` of `models` ("baseline", "patched") exported at `example`'s shape into `folder`, `info` recorded in
    each graph; the graph passes on the patched graph (unless `passes` is False: `hgdeploy export` leaves them to
    `hgdeploy optimize` for an fp32 profile); the twins the profile runs (fused attention for an ONNX Runtime profile
    with fused_attention, fp16 for an fp16 profile); manifest.json. Returns the
    folder and what the passes and the fp16 conversion reported. With `dynamic_batch` the graphs take any batch on
    their first axis (BATCH_AXIS; the example's batch must be at least 2)."""
    export = export_graphs(models, example, folder, info, roles, dynamic_batch)
    return finish_deployable(export, engine, roles, passes)


def export_graphs(models: Models, example: torch.Tensor, folder: Path, info: JsonObject | None = None,
                  roles: tuple[str, ...] = BOTH, dynamic_batch: bool = False) -> ExportFolder:
    """The first half of the road, the only one that needs the models: each role exported and checked."""
    export = ExportFolder(Path(folder))
    for role in roles:
        target = export.target(role)
        with progress.step(f"Exporting {target.name} (opset {OPSET}, static shapes, checked)"):
            path = export_onnx(getattr(models, role), example, target, models.family.output_names, info,
                               dynamic_batch=dynamic_batch)
        export = export.with_graph(role, path)
    return export


def finish_deployable(export: ExportFolder, engine: EngineProfile, roles: tuple[str, ...] = BOTH,
                      passes: bool = True) -> tuple[ExportFolder, Report]:
    """The second half, on the graphs alone (a caller may drop its models first): passes, twins, manifest."""
    report = Report()
    if passes and "patched" in roles:
        export, optimized = optimize_patched(export)
        report |= Report(optimize=optimized)
    if runs_twins(engine):
        export, twins = write_twins(export, engine, roles)
        report |= Report(fusion=twins.fusion, fp16=twins.fp16)
    export.write_manifest()
    return export, report
