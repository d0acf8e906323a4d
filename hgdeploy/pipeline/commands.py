"""The commands that need the PyTorch models, each from checked inputs to its report: run, export, check, flops,
bench. The command line reads and checks the recipe, engine profile, photos and folders first (nothing is
loaded or written before); every graph is written by the one road, `road.write_deployable`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hgdeploy.backends import EngineProfile, load_profile
from hgdeploy.core.files import staged_output
from hgdeploy.core.recipe import Recipe
from hgdeploy.graph.folder import ExportFolder
from hgdeploy.measure.images import Photo
from hgdeploy.measure.report import write_report
from hgdeploy.pipeline.context import load_context
from hgdeploy.pipeline.road import write_deployable
from hgdeploy.pipeline.steps import backend_info, bench, check, flops


def run(recipe: Recipe, engine: EngineProfile, photos: list[Photo], out: Path) -> dict[str, Any]:
    """`hgdeploy run`: export, passes, check, FLOPs and bench into one output folder (staged: it appears whole)."""
    ctx = load_context(recipe, engine, photos)
    info = ctx.describe()
    report: dict[str, Any] = info | {"backend": backend_info(ctx), "images": [p.name for p in photos]}
    with staged_output(out) as stage:
        folder, steps = write_deployable(ctx.models, ctx.example, engine, stage, info)
        report |= steps | check(ctx, folder) | flops(ctx) | bench(ctx, folder)
        write_report(stage, report)
    return report


def export(recipe: Recipe, engine: EngineProfile, out: Path) -> dict[str, Any]:
    """`hgdeploy export`: baseline.onnx and patched.onnx planned for the profile's device; for an fp16 profile also
    the graph passes and the fp16 twins. The profile need not run here."""
    ctx = load_context(recipe, engine)
    info = ctx.describe()
    report = info | {"engine": {"profile": engine.name, "device": engine.device, "precision": engine.precision}}
    with staged_output(out) as stage:
        folder, steps = write_deployable(ctx.models, ctx.example, engine, stage, info,
                                         passes=engine.precision == "fp16")
    return report | steps | {"onnx": {role: str(out / path.name) for role, path in folder.graphs.items()}}


def check_folder(recipe: Recipe, engine: EngineProfile, photos: list[Photo], export: ExportFolder) -> dict[str, Any]:
    """`hgdeploy check`: parity and fidelity of an exported folder on photos."""
    ctx = load_context(recipe, engine, photos, export)
    return ctx.describe() | check(ctx, export)


def flops_report(recipe: Recipe) -> dict[str, Any]:
    """`hgdeploy flops`: the models as the default (CPU) profile plans them."""
    ctx = load_context(recipe, load_profile())
    return ctx.describe() | flops(ctx)


def bench_models(recipe: Recipe, engine: EngineProfile, export: ExportFolder | None, with_torch: bool) -> dict[str, Any]:
    """`hgdeploy bench` when PyTorch is involved: torch timed too, or no exported folder to time (the models are
    exported to a temporary folder first)."""
    ctx = load_context(recipe, engine, export=export)
    report = ctx.describe() | {"backend": backend_info(ctx)} | flops(ctx)
    if export is not None:
        return report | bench(ctx, export, with_torch)
    with tempfile.TemporaryDirectory(prefix="hgdeploy-bench-") as tmp:
        folder, _ = write_deployable(ctx.models, ctx.example, engine, Path(tmp), ctx.describe())
        return report | bench(ctx, folder, with_torch)
