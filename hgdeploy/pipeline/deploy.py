"""The deploy side of every command: graph passes, lint, engine builds and engine timings on ONNX files.

Works on the files an export wrote (baseline.onnx, patched.onnx, patched.opt.onnx) and what they
record about themselves; needs onnx, graph-surgeon and the backends, never torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hgdeploy.core import progress
from hgdeploy.backends import EngineProfile, backend_versions, load_profile, make_runner, require_available
from hgdeploy.measure.timing import Timing, bench_interleaved, machine_info
from hgdeploy.core.contract import INPUT_NAME, check_model, graph_sha256, is_layer_node, read_export_info, save_onnx
from hgdeploy.core.errors import UserError
from hgdeploy.graph.fp16 import to_fp16
from hgdeploy.graph.flops import onnx_gflops
from hgdeploy.graph.lint import DEFAULT_MAJOR, format_finding, lint_model
from hgdeploy.core.memory import releases_memory
from hgdeploy.core.files import check_output_folder, to_json, write_atomic
from hgdeploy.graph.passes import PASSES, optimize
from hgdeploy.core.recipe import Recipe, load_recipe

ONNX_FILES = {"baseline": "baseline.onnx", "patched": "patched.onnx", "optimized": "patched.opt.onnx",
              "baseline_fp16": "baseline.fp16.onnx", "patched_fp16": "patched.fp16.onnx"}
DEFAULT_OUT = Path("runs")


def output_folder(recipe_name: str, out: Path | None) -> Path:
    """Where a command writes or reads: --out, else runs/<recipe name>."""
    return Path(out) if out is not None else DEFAULT_OUT / recipe_name


def existing_onnx(folder: Path) -> dict[str, Path]:
    """baseline/patched (required) and the optimized graph (when `hgdeploy optimize` made one)."""
    paths = {k: Path(folder) / v for k, v in ONNX_FILES.items() if (Path(folder) / v).is_file()}
    missing = [str(Path(folder) / ONNX_FILES[k]) for k in ("baseline", "patched") if k not in paths]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; run `hgdeploy export` with the same --out first")
    return paths


def deployed(paths: dict[str, Path], profile: EngineProfile | None = None) -> Path:
    """The patched graph an engine is built from: the fp16 one for an fp16 profile, else the optimized one
    when it exists."""
    if profile is not None and profile.precision == "fp16":
        return _fp16(paths, "patched_fp16", profile)
    return paths.get("optimized", paths["patched"])


def baseline_graph(paths: dict[str, Path], profile: EngineProfile) -> Path:
    """The unpatched graph the patched one is timed against, in the same precision."""
    return _fp16(paths, "baseline_fp16", profile) if profile.precision == "fp16" else paths["baseline"]


def _fp16(paths: dict[str, Path], key: str, profile: EngineProfile) -> Path:
    if key not in paths:
        raise UserError(f"{paths['patched'].parent / ONNX_FILES[key]} not found: the {profile.name} profile runs fp16 "
                        f"graphs; write them with `hgdeploy export --engine {profile.name}` (same recipe and --out)")
    return paths[key]


def write_fp16(paths: dict[str, Path], folder: Path, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """baseline.fp16.onnx and patched.fp16.onnx (from the optimized graph): fp16 weights and compute, fp32
    inputs/outputs, the clustering layers and LayerNorm in fp32; each type-checked and linted. keys: only
    these of the two ("patched_fp16" for a graph timed against a baseline converted once)."""
    report: dict[str, Any] = {}
    sources = (("baseline_fp16", paths["baseline"]), ("patched_fp16", deployed(paths)))
    for key, source in sources if keys is None else [s for s in sources if s[0] in keys]:
        paths[key], report[key] = _fp16_graph(source, Path(folder) / ONNX_FILES[key])
    return {"fp16": report}


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


def export_info(paths: dict[str, Path]) -> dict[str, Any]:
    """What the export recorded about itself (recipe values, plan, preprocessing); {} for older exports."""
    return read_export_info(onnx.load(str(paths["patched"]), load_external_data=False)) or {}


def recipe_difference(recorded: dict[str, Any], now: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first recipe value (section.key, as exported, as asked now) that differs; [ci] and [eval] do not
    change an export and do not count."""
    for section in sorted((set(recorded) | set(now)) - {"ci", "eval"}):
        old, new = recorded.get(section, {}), now.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return f"{section}.{key}", old.get(key), new.get(key)
    return None


def _shown(value: Any) -> str:
    return "(not set)" if value is None else repr(value)


def exported(folder: Path, recipe: Recipe) -> tuple[dict[str, Path], dict[str, Any]]:
    """The ONNX files in `folder` and what the export recorded (export_info), refused when they were
    exported from other recipe values than `recipe`'s."""
    paths = existing_onnx(folder)
    info = export_info(paths)
    if not info:
        progress.info(f"note: {paths['patched']} does not record the recipe it was exported with (an older "
                      f"hgdeploy?); it is used as it is")
        return paths, info
    diff = recipe_difference(info.get("recipe", {}).get("values", {}), json.loads(json.dumps(recipe.data)))
    if diff:
        key, old, new = diff
        raise UserError(f"{folder} was exported with {key} = {_shown(old)}, but this command asks for "
                        f"{_shown(new)}; export again with these values (hgdeploy export ... --out "
                        f"{folder}) or give the recipe and --set values the folder was exported with")
    return paths, info


def open_export(recipe: str | None, overrides: list[str], engine: str | None, out: Path | None,
                writes: bool = False) -> tuple[dict[str, Path], EngineProfile]:
    """Everything a deploy-side command checks before any work: recipe, profile (and that it runs here),
    the exported folder (made with this recipe's values) and, when the command writes there, that it can."""
    rec = load_recipe(recipe, overrides)
    profile = load_profile(engine)
    require_available(profile)
    folder = output_folder(rec.name, out)
    paths, _ = exported(folder, rec)
    if writes:
        check_output_folder(folder)
    return paths, profile


@releases_memory
def optimize_graph(paths: dict[str, Path], folder: Path) -> dict[str, Any]:
    """Run the graph passes on patched.onnx -> patched.opt.onnx; node counts and GFLOPs before/after, lint."""
    model = onnx.load(str(paths["patched"]))  # with its external weights, if it has them
    with progress.step(f"Optimizing {paths['patched'].name}: {', '.join(name for name, _ in PASSES)}"):
        out, notes = optimize(model)
    target = save_onnx(out, Path(folder) / ONNX_FILES["optimized"])
    check_model(target)
    paths["optimized"] = target
    before, after = onnx_gflops(model, is_layer_node(model)), onnx_gflops(out, is_layer_node(out))
    findings = lint_model(out, DEFAULT_MAJOR)
    return {"optimize": {"passes": notes, "nodes": {"before": len(model.graph.node), "after": len(out.graph.node)},
                         "gflops": {"before": before.to_dict(), "after": after.to_dict()}},
            "lint": {"model": target.name, "trt_major": DEFAULT_MAJOR, "clean": not findings,
                     "findings": [format_finding(f) for f in findings]}}


def engine_graphs(paths: dict[str, Path], profile: EngineProfile) -> dict[str, Path]:
    """The graphs a profile runs: baseline and patched in its precision and, for an fp32 profile with an
    optimized graph, the patched graph before the passes too."""
    graphs = {"baseline": baseline_graph(paths, profile), "patched": deployed(paths, profile)}
    if "optimized" in paths and profile.precision == "fp32":
        graphs["patched_unoptimized"] = paths["patched"]
    return graphs


def engine_runners(paths: dict[str, Path], profile: EngineProfile) -> dict[str, Any]:
    """The profile's runner for each graph it runs (engine_graphs)."""
    return {key: make_runner(path, profile) for key, path in engine_graphs(paths, profile).items()}


def time_runners(runners: dict[str, Any], feed: dict[str, np.ndarray], profile: EngineProfile) -> dict[str, Any]:
    """Median latency of every runner, interleaved in one run; speedup = baseline / patched.

    On a GPU the engines are timed on device-resident inputs and outputs (no host copies).
    """
    timings = time_interleaved(runners, feed, profile)
    lat = {k: t.median_ms for k, t in timings.items()}
    out: dict[str, Any] = {"latency_ms": lat, "latency": {k: t.to_dict() for k, t in timings.items()},
                           "speedup": lat["baseline"] / lat["patched"]}
    if "torch_baseline" in lat:
        out["speedup_torch"] = lat["torch_baseline"] / lat["torch_patched"]
    return out


def time_interleaved(runners: dict[str, Any], feed: dict[str, np.ndarray], profile: EngineProfile,
                     feeds: dict[str, dict[str, np.ndarray]] | None = None, what: str | None = None) -> dict[str, Timing]:
    """The profile's warm-up and interleaved runs of every runner, with a progress bar; on a GPU on
    device-resident inputs and outputs (no host copies). feeds: bench_interleaved's per-runner feeds."""
    p = profile
    kwargs = {"copy_outputs_to_host": False} if p.on_gpu else {}
    with progress.step(f"Timing {what or ', '.join(runners)} ({p.warmup} warm-up, {p.runs} interleaved runs)",
                       total=p.runs) as advance:
        return bench_interleaved(runners, feed, p.warmup, p.runs, on_round=lambda _: advance(), infer_kwargs=kwargs,
                                 feeds=feeds)


def zeros_feed(path: Path) -> dict[str, np.ndarray]:
    """A zero input of the graph's static shape: latency does not depend on the values."""
    model = onnx.load(str(path), load_external_data=False)
    inp = next(i for i in model.graph.input if i.name == INPUT_NAME)
    return {INPUT_NAME: np.zeros([d.dim_value for d in inp.type.tensor_type.shape.dim], np.float32)}


def graph_gflops(paths: dict[str, Path], profile: EngineProfile) -> dict[str, float]:
    """GFLOPs of the exported graphs the profile runs, counted from their static shapes."""
    base = onnx.load(str(baseline_graph(paths, profile)), load_external_data=False)
    patched = onnx.load(str(deployed(paths, profile)), load_external_data=False)
    b, p = onnx_gflops(base, lambda n: False), onnx_gflops(patched, is_layer_node(patched))
    return {"baseline": b.total, "patched": p.total, "clustering": p.clustering, "ratio": p.total / b.total}


def backend_info(profile: EngineProfile, extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    return profile.to_dict() | {"versions": backend_versions(profile) | (extra_versions or {}),
                                "machine": machine_info()}


def bench(paths: dict[str, Path], profile: EngineProfile) -> dict[str, Any]:
    """The engines of an exported folder timed interleaved (no PyTorch): what `hgdeploy bench --out` reports."""
    info = export_info(paths)
    report: dict[str, Any] = {"plan": info.get("plan"), "backend": backend_info(profile),
                              "gflops": graph_gflops(paths, profile)}
    return report | time_runners(engine_runners(paths, profile), zeros_feed(paths["baseline"]), profile)


def optimize_folder(paths: dict[str, Path], profile: EngineProfile) -> dict[str, Any]:
    """`hgdeploy optimize`: the passes on folder/patched.onnx, then the engines before and after, timed."""
    report = optimize_graph(paths, paths["patched"].parent)
    return report | time_runners(engine_runners(paths, profile), zeros_feed(paths["baseline"]), profile)


def build(paths: dict[str, Path], profile: EngineProfile) -> dict[str, Any]:
    """`hgdeploy build`: an engine for every exported graph; engine.<profile>.json records what was built."""
    manifest: dict[str, Any] = {"profile": backend_info(profile), "engines": {}}
    for key, path in engine_graphs(paths, profile).items():
        with progress.step(f"Building {profile.name} engine for {path.name}"):
            with make_runner(path, profile) as runner:
                meta = runner.get_input_metadata(use_numpy_dtypes=False)
        manifest["engines"][key] = {"source": str(path), "source_sha256": graph_sha256(path),
                                    "inputs": {n: list(m.shape) for n, m in meta.items()}}
    write_atomic(paths["baseline"].parent / f"engine.{profile.name}.json", to_json(manifest))
    return {"backend": manifest["profile"], "engines": manifest["engines"]}
