"""The steps behind every CLI command: prepare (validate everything), export, flops, check, bench.

`prepare` reads and validates all user input before anything is written, so bad input never
leaves a half-written output folder. Output files are staged and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

from hgdeploy import progress
from hgdeploy.adapters.registry import Models, build_models
from hgdeploy.backends import EngineProfile, backend_versions, load_profile, make_runner, torch_runner
from hgdeploy.bench import bench_interleaved, machine_info
from hgdeploy.checks import fidelity, outputs_of, parity, run_all
from hgdeploy.errors import UserError
from hgdeploy.export import INPUT_NAME, check_model, export_onnx
from hgdeploy.flops import count_gflops_fast, onnx_gflops
from hgdeploy.images import Photo, load_photos, to_batch
from hgdeploy.layers import TokenClustering
from hgdeploy.lint import DEFAULT_MAJOR, format_finding, lint_model
from hgdeploy.passes import PASSES, is_layer_node, optimize
from hgdeploy.recipe import Recipe, load_recipe
from hgdeploy.report import write_atomic_bytes

ONNX_FILES = {"baseline": "baseline.onnx", "patched": "patched.onnx", "optimized": "patched.opt.onnx"}


@dataclass
class Job:
    """Everything one command works on, validated."""

    recipe: Recipe
    models: Models
    profile: EngineProfile | None = None
    photos: list[Photo] | None = None

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
            images: str | None = None, need_profile: bool = False, need_photos: bool = False) -> Job:
    """Validate recipe, profile and images, then load and patch the model. Raises UserError."""
    rec = load_recipe(recipe, overrides or [])
    profile = load_profile(engine) if need_profile else None
    photos = load_photos(images) if need_photos else None
    with progress.step(f"Loading {rec.family} ({rec.checkpoint or 'default weights'}) and patching"):
        models = build_models(rec)
    return Job(rec, models, profile, photos)


def describe(job: Job) -> dict[str, Any]:
    """Report keys every command shares: recipe, plan, preprocessing."""
    forms = sorted({m.form for m in job.models.patched.modules() if isinstance(m, TokenClustering)})
    return {
        "recipe": {"name": job.recipe.name, "path": job.recipe.path, "values": job.recipe.data},
        "plan": job.models.plan.to_dict() | {"clustering_form": ",".join(forms)},
        "preprocess": dataclasses.asdict(job.models.preprocess),
    }


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A hidden staging folder beside `out`; its files replace those in `out` only on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.replace(out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_models(job: Job, folder: Path) -> dict[str, Path]:
    """baseline.onnx and patched.onnx in `folder`, exported at the recipe's input size and checked."""
    paths = {}
    names = job.models.family.output_names
    for key, model in (("baseline", job.models.baseline), ("patched", job.models.patched)):
        with progress.step(f"Exporting {ONNX_FILES[key]} (opset 18, static shapes, checked)"):
            paths[key] = export_onnx(model, job.example, Path(folder) / ONNX_FILES[key], names)
    return paths


def existing_onnx(folder: Path) -> dict[str, Path]:
    """baseline/patched (required) and the optimized graph (when `hgdeploy optimize` made one)."""
    paths = {k: Path(folder) / v for k, v in ONNX_FILES.items() if (Path(folder) / v).is_file()}
    missing = [str(Path(folder) / ONNX_FILES[k]) for k in ("baseline", "patched") if k not in paths]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; run `hgdeploy export` with the same --out first")
    return paths


def deployed(paths: dict[str, Path]) -> Path:
    """The patched graph an engine is built from: the optimized one when it exists."""
    return paths.get("optimized", paths["patched"])


def passes_unsupported(paths: dict[str, Path]) -> str | None:
    """Why the graph passes cannot run on this export (None when they can)."""
    data = paths["patched"].with_name(paths["patched"].name + ".data")
    if data.exists():
        return (f"{paths['patched'].name} keeps its weights in {data.name} (over protobuf's 2 GB limit); the graph "
                f"passes work on graphs held in memory and do not support that yet: build, check and bench "
                f"{paths['patched'].name} directly")
    return None


def optimize_graph(paths: dict[str, Path], folder: Path) -> dict[str, Any]:
    """Run the graph passes on patched.onnx -> patched.opt.onnx; node counts and GFLOPs before/after."""
    reason = passes_unsupported(paths)
    if reason:
        raise UserError(reason)
    model = onnx.load(str(paths["patched"]))
    with progress.step(f"Optimizing {paths['patched'].name}: {', '.join(name for name, _ in PASSES)}"):
        out, notes = optimize(model)
    target = Path(folder) / ONNX_FILES["optimized"]
    write_atomic_bytes(target, out.SerializeToString())
    check_model(target)
    paths["optimized"] = target
    before, after = onnx_gflops(model, is_layer_node(model)), onnx_gflops(out, is_layer_node(out))
    findings = lint_model(out, DEFAULT_MAJOR)
    return {"optimize": {"passes": notes, "nodes": {"before": len(model.graph.node), "after": len(out.graph.node)},
                         "gflops": {"before": before.to_dict(), "after": after.to_dict()}},
            "lint": {"model": target.name, "trt_major": DEFAULT_MAJOR, "clean": not findings,
                     "findings": [format_finding(f) for f in findings]}}


def flops(job: Job) -> dict[str, Any]:
    with progress.step("Counting FLOPs of baseline and patched models"):
        base = count_gflops_fast(job.models.baseline, job.example)
        patched = count_gflops_fast(job.models.patched, job.example)
    return {"gflops": {"baseline": base.total, "patched": patched.total, "clustering": patched.clustering,
                       "ratio": patched.total / base.total}}


def check(job: Job, paths: dict[str, Path]) -> dict[str, Any]:
    """Parity of the patched engine against PyTorch, fidelity of patched against unpatched PyTorch."""
    assert job.profile is not None
    names = job.models.family.output_names
    example = job.example
    runners = [
        torch_runner(job.models.patched, example, names, INPUT_NAME, "torch-patched"),
        make_runner(deployed(paths), job.profile),
        torch_runner(job.models.baseline, example, names, INPUT_NAME, "torch-baseline"),
    ]
    feeds = job.feeds()
    with progress.step(f"Running {len(feeds)} images through PyTorch (baseline, patched) and the {job.profile.name} engine"):
        results = run_all(runners, feeds)
    torch_patched, engine, torch_base = (outputs_of(results, r.name) for r in runners)
    par = parity(engine, torch_patched, job.profile.cosine_min, job.profile.max_abs)
    fid = fidelity(torch_patched, torch_base, dict(job.models.family.outputs), [p.name for p in job.photos or []])
    return {"parity": par.to_dict() | {"engine_model": deployed(paths).name}, "fidelity": fid}


def bench(job: Job, paths: dict[str, Path], with_torch: bool = False) -> dict[str, Any]:
    """Median latency of the baseline and patched engines (the unoptimized graph too, when there is an
    optimized one; torch eager too with `with_torch`), all interleaved in one run."""
    assert job.profile is not None
    p = job.profile
    runners = {"baseline": make_runner(paths["baseline"], p), "patched": make_runner(deployed(paths), p)}
    if "optimized" in paths:
        runners["patched_unoptimized"] = make_runner(paths["patched"], p)
    if with_torch:
        names = job.models.family.output_names
        runners["torch_baseline"] = torch_runner(job.models.baseline, job.example, names, INPUT_NAME, "torch-baseline")
        runners["torch_patched"] = torch_runner(job.models.patched, job.example, names, INPUT_NAME, "torch-patched")
    feed = {INPUT_NAME: job.example.numpy()}
    with progress.step(f"Timing {', '.join(runners)} ({p.warmup} warm-up, {p.runs} interleaved runs)",
                       total=p.runs) as advance:
        timings = bench_interleaved(runners, feed, p.warmup, p.runs, on_round=lambda _: advance())
    lat = {k: t.median_ms for k, t in timings.items()}
    out = {"latency_ms": lat, "latency": {k: t.to_dict() for k, t in timings.items()},
           "speedup": lat["baseline"] / lat["patched"]}
    if with_torch:
        out["speedup_torch"] = lat["torch_baseline"] / lat["torch_patched"]
    return out


def backend_info(job: Job) -> dict[str, Any]:
    assert job.profile is not None
    return job.profile.to_dict() | {"versions": backend_versions(job.profile), "machine": machine_info()}
