"""The commands that need the PyTorch models, each from checked inputs to its report: run, export, check, flops,
bench. The command line reads and checks the recipe, engine profile, photos and folders first (nothing is
loaded or written before); every graph is written by the one road, `road.write_deployable`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from hgdeploy.backends import EngineProfile, load_profile
from hgdeploy.backends.onnxrt import LEAN_GRAPH_BYTES
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.memory import release_memory
from hgdeploy.core.process import in_fresh_process
from hgdeploy.core.files import JsonObject, staged_output, to_json, write_atomic, write_atomic_bytes
from hgdeploy.core.recipe import Recipe
from hgdeploy.graph.folder import ExportFolder, runs_twins
from hgdeploy.measure.images import Photo
from hgdeploy.measure.report import QualityBudget, quality, write_report
from hgdeploy.measure.results import Report
from hgdeploy.measure.throughput import batch_row, render_plot
from hgdeploy.patch.export import weight_bytes
from hgdeploy.pipeline.context import load_context
from hgdeploy.pipeline.road import export_graphs, finish_deployable, write_deployable
from hgdeploy.pipeline import engines, steps

# Weights from which `run` exports and checks in processes of their own (core.process): the graphs and sessions of
# such a model are large enough that the heap an export leaves behind (2-2.7 GB for SwinV2-L) would come on top of
# every later step. The same line as the lean ONNX Runtime sessions (backends.onnxrt.LEAN_GRAPH_BYTES): both mark
# the models whose sessions and graphs count in GB. A small model loads in seconds; loading it twice more would
# cost more than it saves.
FRESH_PROCESS_BYTES = LEAN_GRAPH_BYTES


def run(recipe: Recipe, engine: EngineProfile, photos: list[Photo], out: Path,
        budget: QualityBudget | None = None) -> Report:
    """`hgdeploy run`: export, passes, check, FLOPs and bench into one output folder (staged: it appears whole);
    with a `budget`, the fidelity held against it (report.json's quality, beside the speed in the verdict).
    A big model (weights of FRESH_PROCESS_BYTES or more) is exported, passed and checked each in a process of its
    own."""
    ctx = load_context(recipe, engine, photos)
    fresh = weight_bytes(ctx.models.baseline) >= FRESH_PROCESS_BYTES  # plan_memory counts the activations
    estimate = steps.plan_memory(ctx, "run", ("export", "passes", "check", "latency"), torch_models=False,
                                 apart=fresh)
    info = ctx.describe()
    report = info | Report(backend=steps.backend_info(ctx), images=[p.name for p in photos])
    recorded_info = info.to_json() | recorded(estimate)
    with staged_output(out) as stage:
        if fresh:
            counted = steps.flops(ctx)
            feed = {INPUT_NAME: ctx.example.numpy()}
            del ctx  # this process holds no model while the others export and check
            release_memory()
            graphs = in_fresh_process("export", exported_for_run, recipe, engine, photos, stage, recorded_info)
            folder, written = in_fresh_process("passes", finish_deployable, graphs, engine)
            report = report | written | in_fresh_process("check", checked_export, recipe, engine, photos, folder)
            report = report | counted
        else:
            folder, written = write_deployable(ctx.models, ctx.example, engine, stage, recorded_info,
                                               dynamic_batch=recipe.dynamic_batch)
            report = report | written | steps.check(ctx, folder) | steps.flops(ctx)
            feed = {INPUT_NAME: ctx.example.numpy()}
            del ctx  # the PyTorch models are not timed here: their memory goes before the engines' sessions
            release_memory()
        report = report | judged(report, budget)
        report = report | Report(latency=engines.time_engines(folder, engine, feed=feed))
        report = report | steps.measured_memory(estimate)
        write_report(stage, report.to_json())
    return report


def exported_for_run(recipe: Recipe, engine: EngineProfile, photos: list[Photo], folder: Path,
                     info: JsonObject) -> ExportFolder:
    """The first half of run's export road in a process of its own: the models loaded there again (the same seeded
    weights, the same calibrated tau) and exported into `folder` with `info` recorded. The passes and twins, which
    need the graphs alone, run in another fresh process: after the export even dropping the models left SwinV2-L's
    process at 2.7 GB, and its attention fusion peaked at 7.0 GB on top of that."""
    ctx = load_context(recipe, engine, photos)
    return export_graphs(ctx.models, ctx.example, folder, info, dynamic_batch=recipe.dynamic_batch)


def checked_export(recipe: Recipe, engine: EngineProfile, photos: list[Photo], folder: ExportFolder) -> Report:
    """run's parity and fidelity in a process of its own, as `hgdeploy check` on the folder just written."""
    return steps.check(load_context(recipe, engine, photos, folder), folder)


def judged(report: Report, budget: QualityBudget | None) -> Report:
    """The report's fidelity held against the budget (nothing without one)."""
    return Report() if budget is None else Report(quality=quality(report.fidelity, budget))


def recorded(estimate: JsonObject) -> JsonObject:
    """What an export records of its model's memory need: the deploy-side commands estimate from it."""
    return {"memory": {k: estimate[k] for k in ("weights_gb", "activations_gb")}}


def export(recipe: Recipe, engine: EngineProfile, out: Path) -> Report:
    """`hgdeploy export`: baseline.onnx and patched.onnx planned for the profile's device; for a profile that runs
    twins (fp16, fused attention) also the graph passes and those twins. The profile need not run here."""
    ctx = load_context(recipe, engine)
    estimate = steps.plan_memory(ctx, "export", ("export", "passes") if runs_twins(engine) else ("export",))
    info = ctx.describe()
    with staged_output(out) as stage:
        folder, written = write_deployable(ctx.models, ctx.example, engine, stage, info.to_json() | recorded(estimate),
                                           passes=runs_twins(engine), dynamic_batch=recipe.dynamic_batch)
    made_for = Report(engine={"profile": engine.name, "device": engine.device, "precision": engine.precision})
    return (info | made_for | written | Report(onnx={role: str(out / path.name) for role, path in folder.graphs.items()})
            | steps.measured_memory(estimate))


def check(recipe: Recipe, engine: EngineProfile, photos: list[Photo], export: ExportFolder,
          budget: QualityBudget | None = None) -> Report:
    """`hgdeploy check`: parity and fidelity of an exported folder on photos (held against `budget`, if any)."""
    ctx = load_context(recipe, engine, photos, export)
    estimate = steps.plan_memory(ctx, "check", ("check",))
    checked = steps.check(ctx, export)
    return ctx.describe() | checked | judged(checked, budget) | steps.measured_memory(estimate)


def flops(recipe: Recipe) -> Report:
    """`hgdeploy flops`: the models as the default (CPU) profile plans them."""
    ctx = load_context(recipe, load_profile())
    return ctx.describe() | steps.flops(ctx)


def bench(recipe: Recipe, engine: EngineProfile, export: ExportFolder | None, with_torch: bool,
          profile: bool = False) -> Report:
    """`hgdeploy bench` when PyTorch is involved: torch timed too, or no exported folder to time (the models are
    exported to a temporary folder first, and a profile's profile.json goes with it: shown, not kept)."""
    ctx = load_context(recipe, engine, export=export)
    estimate = steps.plan_memory(ctx, "bench", ("latency",) if export is not None else ("export", "passes", "latency"))
    report = ctx.describe() | Report(backend=steps.backend_info(ctx)) | steps.flops(ctx) | Report(memory=estimate)
    if export is not None:
        return report | steps.latency(ctx, export, with_torch) | steps.profile(ctx, export, profile)
    with tempfile.TemporaryDirectory(prefix="hgdeploy-bench-") as tmp:
        folder, _ = write_deployable(ctx.models, ctx.example, engine, Path(tmp), ctx.describe().to_json(),
                                     dynamic_batch=recipe.dynamic_batch)
        return report | steps.latency(ctx, folder, with_torch) | steps.profile(ctx, folder, profile)


BATCH_FILES = ("batch.json", "batch.png")


def bench_batches(recipe: Recipe, engine: EngineProfile, batches: list[int], with_torch: bool, out: Path) -> Report:
    """`hgdeploy bench --batch 1,8,32`: the models exported at each batch (static shapes, a temporary folder each)
    and their engines timed interleaved there, with PyTorch too under `with_torch`; out/batch.json holds the rows
    and out/batch.png the speed-up against the batch."""
    ctx = load_context(recipe, engine)
    report = ctx.describe() | Report(backend=steps.backend_info(ctx)) | steps.flops(ctx)
    rows = []
    for batch in batches:
        at = dataclasses.replace(ctx, recipe=recipe.with_batch(batch))
        with tempfile.TemporaryDirectory(prefix=f"hgdeploy-batch{batch}-") as tmp:
            folder, _ = write_deployable(ctx.models, at.example, engine, Path(tmp), at.describe().to_json())
            extra = steps.torch_runners(at, on_profile=True) if with_torch else {}
            latency = engines.time_engines(folder, engine, ("baseline", "patched"),
                                           feed={INPUT_NAME: at.example.numpy()}, extra=extra)
        rows.append(batch_row(latency))
    report = report | Report(batches=rows)
    write_atomic(out / BATCH_FILES[0], to_json(report.to_json()))
    write_atomic_bytes(out / BATCH_FILES[1], render_plot(rows, engine.name))
    return report
