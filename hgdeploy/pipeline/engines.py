"""Engines of an export folder: runners, interleaved timings, builds; and the deploy-side commands (optimize,
build, bench of a folder) that need ONNX files alone, never torch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner

from hgdeploy.backends import EngineProfile, backend_versions, end_profiling, make_runner, require_profiler
from hgdeploy.backends.onnxrt import LEAN_GRAPH_BYTES, graph_bytes
from hgdeploy.core import progress
from hgdeploy.core.contract import INPUT_NAME, graph_sha256, is_layer_node, node_scopes, read_clustering_specs
from hgdeploy.core.files import JsonObject, to_json, write_atomic
from hgdeploy.core.memory import Need, estimate_memory
from hgdeploy.core.recipe import DYNAMIC_EXAMPLE
from hgdeploy.graph.deploy import optimize_patched, with_twins, write_twins
from hgdeploy.graph.flops import onnx_gflops
from hgdeploy.graph.folder import ExportFolder, runs_twins
from hgdeploy.measure.profile import GraphProfile, Layers, Profiles, read_trace, summarise
from hgdeploy.measure.results import Latency, Report
from hgdeploy.measure.timing import Timings, machine_info, time_interleaved


def sessions(engine: EngineProfile, lean: bool = False) -> int:
    """ONNX Runtime sessions timed side by side: baseline and patched, and the patched graph before the passes for a
    plain fp32 profile (ExportFolder.engine_graphs) unless the graphs are `lean` (see in_pairs)."""
    return 2 if runs_twins(engine) or lean else 3


EVERY_GRAPH = ("baseline", "patched", "patched_unoptimized")


def in_pairs(folder: ExportFolder, engine: EngineProfile) -> bool:
    """Graphs over LEAN_GRAPH_BYTES on the CPU are timed two at a time: each ONNX Runtime session holds about 1.5x
    its weights and a run adds its activations (SwinV2-L at 544 px: 1.4 GB a session, 3.9 GB a run), so a third
    session took `hgdeploy run swinv2_l_coco` at its [ci] shape to 9.5 GB. `run` and `bench` then time
    baseline and patched; `optimize`, whose question is the passes and which holds no PyTorch model, all three."""
    return not engine.on_gpu and graph_bytes(folder.graphs["patched"]) >= LEAN_GRAPH_BYTES


def plan_folder_memory(folder: ExportFolder, engine: EngineProfile, command: str,
                       steps: tuple[str, ...], every_graph: bool = False) -> JsonObject | None:
    """A deploy-side command's estimate from what the export recorded of its model (weights, activations), said
    and, when it cannot fit, refused before any session; None for an export that recorded nothing (older)."""
    recorded = folder.info.get("memory")
    if not recorded:
        return None
    need = Need.from_json(recorded)
    size = tuple(folder.info.get("preprocess", {}).get("size", (0, 0)))
    lean = need.weights >= LEAN_GRAPH_BYTES
    held = sessions(engine, lean and not every_graph)
    estimate = estimate_memory(need, f"hgdeploy {command} {folder.path}", size, steps, held, False,
                               lean=lean)
    progress.info(estimate.pop("said"), markup=False)
    return estimate


def engine_runners(folder: ExportFolder, engine: EngineProfile,
                   roles: tuple[str, ...] | None = None) -> dict[str, BaseRunner]:
    """The profile's runner for each graph it runs (ExportFolder.engine_graphs), or for `roles` of them."""
    graphs = folder.engine_graphs(engine)
    return {key: make_runner(path, engine) for key, path in graphs.items() if roles is None or key in roles}


def time_runners(runners: dict[str, BaseRunner], feed: dict[str, np.ndarray], engine: EngineProfile,
                 feeds: dict[str, dict[str, np.ndarray]] | None = None, what: str | None = None) -> Timings:
    """The profile's warm-up and interleaved runs of every runner, with a progress bar; on a GPU on
    device-resident inputs and outputs (no host copies). feeds: a feed of its own for some runners. The timings
    keep each round's time and the machine's load around the run."""
    kwargs = {"copy_outputs_to_host": False} if engine.on_gpu else {}
    with progress.step(f"Timing {what or ', '.join(runners)} ({engine.warmup} warm-up, {engine.runs} interleaved "
                       f"runs)", total=engine.runs) as advance:
        return time_interleaved(runners, feed, engine.warmup, engine.runs, on_round=lambda _: advance(),
                                infer_kwargs=kwargs, feeds=feeds)


def zeros_feed(path: Path) -> dict[str, np.ndarray]:
    """A zero input of the graph's static shape (a batch of DYNAMIC_EXAMPLE on a batch axis): latency does not
    depend on the values."""
    model = onnx.load(str(path), load_external_data=False)
    inp = next(i for i in model.graph.input if i.name == INPUT_NAME)
    dims = [d.dim_value if d.HasField("dim_value") else DYNAMIC_EXAMPLE for d in inp.type.tensor_type.shape.dim]
    return {INPUT_NAME: np.zeros(dims, np.float32)}


def time_engines(folder: ExportFolder, engine: EngineProfile, roles: tuple[str, ...] | None = None,
                 feed: dict[str, np.ndarray] | None = None, extra: dict[str, BaseRunner] | None = None) -> Latency:
    """The engines of a folder (or `roles` of them, and `extra` runners beside them) timed interleaved on `feed`
    (zeros of the graphs' shape by default): what `hgdeploy bench`, `optimize`, `run` and the GPU report time."""
    if roles is None and in_pairs(folder, engine) and "patched_unoptimized" in folder.engine_graphs(engine):
        roles = ("baseline", "patched")
        progress.info("The patched graph before the passes is not timed beside them: graphs this large are timed "
                      "two at a time, to hold two sessions at once (`hgdeploy optimize` times the passes)")
    runners = engine_runners(folder, engine, roles) | (extra or {})
    feed = feed if feed is not None else zeros_feed(folder.graphs["baseline"])
    timed = time_runners(runners, feed, engine)
    return Latency(dict(timed), batch=int(next(iter(feed.values())).shape[0]), load=timed.load)


PROFILE_RUNS = 10  # profiled runs per graph, after the profile's warm-up
PROFILE_FILE = "profile.json"


def profile_engines(folder: ExportFolder, engine: EngineProfile, feed: dict[str, np.ndarray] | None = None) -> Report:
    """`bench --profile`: the baseline and patched engines run again in profiling sessions of their own (the
    profiler slows every run, so the timed runs never have it), summarised per op type and part of the model
    into folder/profile.json; ORT's trace files go to a temporary folder, removed after. A replayed CUDA graph
    shows the profiler no node, so the profiling sessions run without one."""
    require_profiler(engine)
    engine = dataclasses.replace(engine, cuda_graph=False)
    graphs = {key: path for key, path in folder.engine_graphs(engine).items() if key in ("baseline", "patched")}
    feed = feed if feed is not None else zeros_feed(graphs["baseline"])
    with tempfile.TemporaryDirectory(prefix="hgdeploy-profile-") as tmp:
        profiled = {key: profile_graph(path, folder.graphs[key], engine, feed, Path(tmp) / key)
                    for key, path in graphs.items()}
    profiles = Profiles(engine.name, max(engine.warmup, 1), profiled, list(engine.providers))
    write_atomic(folder.path / PROFILE_FILE, to_json(profiles.to_json()))
    return Report(profile=profiles)


def profile_graph(path: Path, source: Path, engine: EngineProfile, feed: dict[str, np.ndarray],
                  prefix: Path) -> GraphProfile:
    """One graph's profile: warm-up (at least one run: the first pays one-time costs), PROFILE_RUNS runs, the
    trace read back and traced to the module paths of `path` and of the exported graph it came from (`source`:
    the graph passes keep node names but drop the exporter's node metadata)."""
    warmup = max(engine.warmup, 1)
    kwargs = {"copy_outputs_to_host": False} if engine.on_gpu else {}
    with progress.step(f"Profiling {path.name} ({warmup} warm-up, {PROFILE_RUNS} profiled runs)",
                       total=warmup + PROFILE_RUNS) as advance:
        with make_runner(path, engine, profiling=prefix) as runner:
            for _ in range(warmup + PROFILE_RUNS):
                runner.infer(feed, check_inputs=False, **kwargs)
                advance()
            trace = end_profiling(runner)
    models = [onnx.load(str(p), load_external_data=False) for p in dict.fromkeys((source, path))]
    scopes = {name: paths for m in models for name, paths in node_scopes(m).items()}
    return summarise(path.name, read_trace(trace), warmup, Layers.of(scopes, read_clustering_specs(models[0])))


def graph_gflops(folder: ExportFolder, engine: EngineProfile) -> dict[str, float]:
    """GFLOPs of the exported graphs the profile runs, counted from their static shapes."""
    base = onnx.load(str(folder.baseline_graph(engine)), load_external_data=False)
    patched = onnx.load(str(folder.patched_graph(engine)), load_external_data=False)
    b, p = onnx_gflops(base, lambda n: False), onnx_gflops(patched, is_layer_node(patched))
    return {"baseline": b.total, "patched": p.total, "clustering": p.clustering, "ratio": p.total / b.total}


def backend_info(engine: EngineProfile, extra_versions: dict[str, str] | None = None) -> JsonObject:
    """The profile, the library versions behind it and the machine: where a timing was measured."""
    return engine.to_dict() | {"versions": backend_versions(engine) | (extra_versions or {}),
                               "machine": machine_info()}


# ---------------------------------------------------------------------------------------------- commands


def bench_export(folder: ExportFolder, engine: EngineProfile, profile: bool = False) -> Report:
    """`hgdeploy bench --out DIR`: the engines of an exported folder timed interleaved (no PyTorch); with
    `profile`, then profiled per node (profile.json)."""
    memory = plan_folder_memory(folder, engine, "bench", ("latency",))
    report = Report(plan=folder.info.get("plan"), backend=backend_info(engine), gflops=graph_gflops(folder, engine),
                    latency=time_engines(folder, engine), memory=memory)
    return (report | profile_engines(folder, engine)) if profile else report


def optimize_export(folder: ExportFolder, engine: EngineProfile) -> Report:
    """`hgdeploy optimize`: the passes on folder/patched.onnx, then the engines before and after, timed."""
    memory = plan_folder_memory(folder, engine, "optimize", ("passes", "latency"), every_graph=True)
    folder, optimized = optimize_patched(folder)
    twins = None
    if runs_twins(engine):  # the patched twins came from the old graph; a baseline twin may not be there yet
        folder, twins = write_twins(folder, engine, ("patched",))
        folder = with_twins(folder, engine, ("baseline",))
    folder.write_manifest()
    return Report(backend=backend_info(engine), optimize=optimized, fusion=twins and twins.fusion,
                  fp16=twins and twins.fp16, latency=time_engines(folder, engine, EVERY_GRAPH), memory=memory)


def build(folder: ExportFolder, engine: EngineProfile) -> Report:
    """`hgdeploy build`: an engine for every exported graph; engine.<profile>.json records what was built."""
    built: JsonObject = {}
    for key, path in folder.engine_graphs(engine).items():
        with progress.step(f"Building {engine.name} engine for {path.name}"):
            with make_runner(path, engine) as runner:
                meta = runner.get_input_metadata(use_numpy_dtypes=False)
        built[key] = {"source": str(path), "source_sha256": graph_sha256(path),
                      "inputs": {n: list(m.shape) for n, m in meta.items()}}
    report = Report(backend=backend_info(engine), engines=built)
    write_atomic(folder.path / f"engine.{engine.name}.json", to_json({"profile": report.backend, "engines": built}))
    return report
