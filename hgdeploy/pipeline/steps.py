"""The steps behind every command that needs the PyTorch models: prepare, export, FLOPs, check, run.

`prepare` reads and validates all user input before anything is written, so bad input never
leaves a half-written output folder. Output files are staged and moved into place at the end.
The steps on ONNX files alone (passes, engine builds and timings) live in `hgdeploy.pipeline.deploy`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hgdeploy.pipeline import deploy
from hgdeploy.core import progress
from hgdeploy.families.catalogue import get_family
from hgdeploy.backends import EngineProfile, load_profile, make_runner, require_available
from hgdeploy.backends.pyt import torch_runner
from hgdeploy.measure.checks import fidelity, outputs_of, parity, run_all
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.patch.export import export_onnx
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.measure.images import Photo, load_photos, to_batch
from hgdeploy.layers import TokenClustering
from hgdeploy.core.files import check_output_folder, staged_output
from hgdeploy.patch.models import Models, build_models
from hgdeploy.core.recipe import Recipe, load_recipe
from hgdeploy.measure.report import write_report


STRUCTURE_ONLY = ("random weights: these figures only show that the patched graph runs and stays close to "
                  "the unpatched one; they say nothing about a trained model (give --set model.checkpoint=...)")


@dataclass
class Job:
    """Everything one command works on, validated."""

    recipe: Recipe
    models: Models
    folder: Path
    profile: EngineProfile | None = None
    photos: list[Photo] | None = None
    paths: dict[str, Path] | None = None  # the exported ONNX files, for commands that read a folder

    @cached_property
    def batch(self) -> torch.Tensor:
        if not self.photos:
            raise UserError("no images to run on")
        return to_batch(self.photos, self.models.preprocess)

    @property
    def example(self) -> torch.Tensor:
        """Batch-1 input used for export, FLOPs and latency: the first photo, or zeros without photos."""
        if self.photos:
            return self.batch[:1]
        h, w = self.models.preprocess.size
        return torch.zeros(1, 3, h, w)

    def feeds(self) -> list[dict[str, np.ndarray]]:
        return [{INPUT_NAME: self.batch[i:i + 1].numpy()} for i in range(len(self.batch))]


def prepare(recipe: str | None, overrides: list[str] | None = None, engine: str | None = None,
            images: str | None = None, out: Path | None = None, out_mode: str | None = None,
            need_profile: bool = False, need_photos: bool = False, runs_here: bool = True) -> Job:
    """Validate every input before any work, then load and patch the model for the profile's device.

    out_mode "write": the output folder must be writable; "read": it must hold an export made with
    this recipe's values (deploy.exported). runs_here: the profile must run on this machine (export
    only needs its device and precision). Raises UserError.
    """
    rec = load_recipe(recipe, overrides or [])
    profile = load_profile(engine) if need_profile else None
    if profile is not None and runs_here:
        require_available(profile)
    family = get_family(rec.family)
    unknown = profile.unknown_outputs(family.output_names) if profile else []
    if unknown:  # before minutes of loading and exporting
        raise UserError(f"{profile.path}: parity.max_abs_per_output.{unknown[0]} is not an output of family "
                        f"{family.name} (its outputs: {', '.join(family.output_names)})")
    folder = deploy.output_folder(rec.name, out)
    paths, recorded = deploy.exported(folder, rec) if out_mode == "read" else (None, {})
    if out_mode == "write":
        check_output_folder(folder)
    photos = load_photos(images) if need_photos else None
    device = profile.device if profile is not None else "cpu"
    recorded = recorded.get("plan", {})
    planned = recorded.get("device") or device
    if planned != device:
        progress.info(f"note: {folder} was planned for the {planned}; the PyTorch reference is patched the same "
                      f"way so that it matches the graphs (for a {device} plan: hgdeploy export --engine "
                      f"{profile.name if profile else '...'} --out {folder})")
        device = planned
    with progress.step(f"Loading {rec.family} ({weights_source(rec)}) and patching for the {device}"):
        models = build_models(rec, device, lambda pre: to_batch(photos or load_photos(images), pre),
                              recorded.get("tau") if rec.request.tau_auto else None)
    return Job(rec, models, folder, profile, photos, paths)


def weights_source(recipe: Recipe) -> str:
    """Where the weights come from, in words."""
    if recipe.checkpoint:
        return f"checkpoint {recipe.checkpoint}"
    return "random weights (seed 0), no checkpoint given"


def weights(job: Job) -> dict[str, Any]:
    """The weights' provenance: fidelity only means something for trained weights."""
    return {"checkpoint": job.recipe.checkpoint, "pretrained": bool(job.recipe.checkpoint),
            "source": weights_source(job.recipe)}


def describe(job: Job) -> dict[str, Any]:
    """Report keys every command shares: recipe, plan (with the clustering form and why), preprocessing."""
    layers = [m for m in job.models.patched.modules() if isinstance(m, TokenClustering)]
    forms = {"clustering_form": ",".join(sorted({m.form for m in layers})),
             "clustering_form_reason": "; ".join(sorted({m.form_reason for m in layers}))} if layers else {}
    auto = {"tau_auto": job.models.tau_auto} if job.models.tau_auto else {}
    return {
        "recipe": {"name": job.recipe.name, "path": job.recipe.path, "values": job.recipe.data},
        "weights": weights(job),
        "plan": job.models.plan.to_dict() | forms | auto,
        "preprocess": dataclasses.asdict(job.models.preprocess),
    }


def export_models(job: Job, folder: Path) -> dict[str, Path]:
    """baseline.onnx and patched.onnx in `folder`, exported at the recipe's input size and checked."""
    paths = {}
    names = job.models.family.output_names
    info = describe(job)
    for key, model in (("baseline", job.models.baseline), ("patched", job.models.patched)):
        with progress.step(f"Exporting {deploy.ONNX_FILES[key]} (opset 18, static shapes, checked)"):
            paths[key] = export_onnx(model, job.example, Path(folder) / deploy.ONNX_FILES[key], names, info)
    return paths


def export_deployable(job: Job, folder: Path) -> dict[str, Path]:
    """What the profile's engines run, exported into `folder`: baseline and patched graphs, the graph passes
    and, for an fp16 profile, the fp16 graphs (for commands that export to a temporary folder)."""
    assert job.profile is not None
    paths = export_models(job, folder)
    deploy.optimize_graph(paths, folder)
    if job.profile.precision == "fp16":
        deploy.write_fp16(paths, folder)
    return paths


def flops(job: Job) -> dict[str, Any]:
    with progress.step("Counting FLOPs of baseline and patched models"):
        parts = job.models.family.parts
        base = count_gflops_fast(job.models.baseline, job.example, parts)
        patched = count_gflops_fast(job.models.patched, job.example, parts)
    counted = {"baseline": base.total, "patched": patched.total, "clustering": patched.clustering,
               "ratio": patched.total / base.total}
    for (label, b), (_, p) in zip(base.parts, patched.parts):
        counted |= {f"{label}_baseline": b, f"{label}_patched": p, f"{label}_ratio": p / b if b else None}
    return {"gflops": counted}


def torch_runners(job: Job, on_profile: bool = False, reference_on_device: bool = False) -> dict[str, Any]:
    """The unpatched and patched PyTorch models as runners: the fp32 reference on the CPU (parity on a few
    photos); with `reference_on_device` the fp32 reference, eager, on a GPU profile's GPU (eval: a dataset of
    ViT-L windows takes hours on a CPU); with `on_profile` the profile's device, precision and CUDA-graph
    setting (timing like against like)."""
    names, example = job.models.family.output_names, job.example
    settings: dict[str, Any] = {}
    on_gpu = job.profile is not None and job.profile.on_gpu
    if on_gpu and on_profile:
        settings = {"device": "cuda", "cuda_graph": job.profile.cuda_graph,
                    "dtype": torch.float16 if job.profile.precision == "fp16" else torch.float32}
    elif on_gpu and reference_on_device:
        settings = {"device": "cuda"}
    return {"torch_patched": torch_runner(job.models.patched, example, names, INPUT_NAME, "torch-patched", **settings),
            "torch_baseline": torch_runner(job.models.baseline, example, names, INPUT_NAME, "torch-baseline",
                                           **settings)}


def check(job: Job, paths: dict[str, Path]) -> dict[str, Any]:
    """Parity of the patched engine against PyTorch, fidelity of patched against unpatched PyTorch."""
    assert job.profile is not None
    torch_side = torch_runners(job)
    engine_graph = deploy.deployed(paths, job.profile)
    runners = [torch_side["torch_patched"], make_runner(engine_graph, job.profile), torch_side["torch_baseline"]]
    feeds = job.feeds()
    with progress.step(f"Running {len(feeds)} images through PyTorch (baseline, patched) and the {job.profile.name} engine"):
        results = run_all(runners, feeds)
    torch_patched, engine, torch_base = (outputs_of(results, r.name) for r in runners)
    par = parity(engine, torch_patched, job.profile.cosine_min, job.profile.max_abs,
                 job.profile.max_abs_bounds(job.models.family.outputs), job.profile.max_abs_rel)
    fid = fidelity(torch_patched, torch_base, dict(job.models.family.outputs), [p.name for p in job.photos or []])
    if not weights(job)["pretrained"]:
        fid["structure_check_only"] = STRUCTURE_ONLY
    return {"parity": par.to_dict() | {"engine_model": engine_graph.name}, "fidelity": fid}


def bench(job: Job, paths: dict[str, Path], with_torch: bool = False) -> dict[str, Any]:
    """Median latency of the baseline and patched engines (the unoptimized graph too, when there is an
    optimized one; torch eager too with `with_torch`), all interleaved in one run."""
    assert job.profile is not None
    runners = deploy.engine_runners(paths, job.profile) | (torch_runners(job, on_profile=True) if with_torch else {})
    return deploy.time_runners(runners, {INPUT_NAME: job.example.numpy()}, job.profile)


def backend_info(job: Job) -> dict[str, Any]:
    assert job.profile is not None
    return deploy.backend_info(job.profile, {"torch": torch.__version__})


# ---------------------------------------------------------------------------------------------- commands


def run(recipe: str | None, overrides: list[str], engine: str | None, images: str | None,
        out: Path | None) -> tuple[dict[str, Any], Path]:
    """`hgdeploy run`: export, passes, check, FLOPs and bench into one output folder; (report, folder)."""
    job = prepare(recipe, overrides, engine, images, out, "write", need_profile=True, need_photos=True)
    report: dict[str, Any] = describe(job) | {"backend": backend_info(job)}
    report["images"] = [p.name for p in job.photos or []]
    with staged_output(job.folder) as stage:
        paths = export_models(job, stage)
        report |= deploy.optimize_graph(paths, stage)
        if job.profile.precision == "fp16":
            report |= deploy.write_fp16(paths, stage)
        report |= check(job, paths)
        report |= flops(job)
        report |= bench(job, paths)
        write_report(stage, report)
    return report, job.folder


def export(recipe: str | None, overrides: list[str], out: Path | None, engine: str | None = None) -> dict[str, Any]:
    """`hgdeploy export`: baseline.onnx and patched.onnx, planned for the profile's device; for an fp16
    profile also the graph passes and baseline.fp16.onnx / patched.fp16.onnx. The profile need not run here."""
    job = prepare(recipe, overrides, engine, out=out, out_mode="write", need_profile=True, runs_here=False)
    assert job.profile is not None
    report = describe(job) | {"engine": {"profile": job.profile.name, "device": job.profile.device,
                                         "precision": job.profile.precision}}
    with staged_output(job.folder) as stage:
        paths = export_models(job, stage)
        if job.profile.precision == "fp16":
            report |= deploy.optimize_graph(paths, stage) | deploy.write_fp16(paths, stage)
        names = {k: p.name for k, p in paths.items()}
    return report | {"onnx": {k: str(job.folder / n) for k, n in names.items()}}


def check_folder(recipe: str | None, overrides: list[str], engine: str | None, images: str | None,
                 out: Path | None) -> dict[str, Any]:
    """`hgdeploy check`: parity and fidelity of an exported folder on photos."""
    job = prepare(recipe, overrides, engine, images, out, "read", need_profile=True, need_photos=True)
    assert job.paths is not None
    return describe(job) | check(job, job.paths)


def flops_report(recipe: str | None, overrides: list[str]) -> dict[str, Any]:
    """`hgdeploy flops`."""
    job = prepare(recipe, overrides)
    return describe(job) | flops(job)


def bench_models(recipe: str | None, overrides: list[str], engine: str | None, out: Path | None,
                 with_torch: bool) -> dict[str, Any]:
    """`hgdeploy bench` when PyTorch is involved: torch eager timed too, or no exported folder to time."""
    job = prepare(recipe, overrides, engine, out=out, out_mode="read" if out is not None else None,
                  need_profile=True)
    report = describe(job) | {"backend": backend_info(job)} | flops(job)
    if job.paths is not None:
        return report | bench(job, job.paths, with_torch)
    with tempfile.TemporaryDirectory(prefix="hgdeploy-bench-") as tmp:
        return report | bench(job, export_deployable(job, Path(tmp)), with_torch)
