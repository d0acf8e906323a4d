"""The steps on the PyTorch models that commands are made of: parity and fidelity of an export's engine, FLOPs,
and timings with PyTorch beside the engines."""

from __future__ import annotations

import dataclasses

import torch

from hgdeploy.backends import make_runner
from hgdeploy.backends.onnxrt import LEAN_GRAPH_BYTES
from hgdeploy.backends.pyt import TorchRunner, torch_runner
from hgdeploy.core import progress
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.files import JsonObject
from hgdeploy.core.memory import STEPS, Need, estimate_memory, peak_rss_mb
from hgdeploy.core.process import CHILD_PEAKS
from hgdeploy.graph.folder import ExportFolder
from hgdeploy.measure.checks import fidelity_of, fidelity_row, parity_of, parity_terms, stream_all
from hgdeploy.measure.activations import activation_bytes
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.measure.results import Report
from hgdeploy.pipeline import engines
from hgdeploy.pipeline.engines import sessions
from hgdeploy.patch.export import weight_bytes
from hgdeploy.pipeline.context import STRUCTURE_ONLY, Context


def torch_runners(ctx: Context, on_profile: bool = False, reference_on_device: bool = False) -> dict[str, TorchRunner]:
    """The unpatched and patched PyTorch models as runners: the fp32 reference on the CPU; with
    `reference_on_device` the fp32 reference (TF32 off), eager, on a GPU profile's GPU (what parity and eval use:
    Segmenter ViT-L's parity took 79 s on the CPU of an idle H200 machine, an eval dataset takes hours); with
    `on_profile` the profile's device, precision and CUDA-graph setting (timing like against like)."""
    names, example, engine = ctx.models.family.output_names, ctx.example, ctx.engine
    settings: dict[str, str | bool | torch.dtype] = {}
    if engine.on_gpu and on_profile:
        settings = {"device": "cuda", "cuda_graph": engine.cuda_graph,
                    "dtype": torch.float16 if engine.precision == "fp16" else torch.float32}
    elif engine.on_gpu and reference_on_device:
        settings = {"device": "cuda"}
    return {"torch_patched": torch_runner(ctx.models.patched, example, names, INPUT_NAME, "torch-patched", **settings),
            "torch_baseline": torch_runner(ctx.models.baseline, example, names, INPUT_NAME, "torch-baseline",
                                           **settings)}


def check(ctx: Context, folder: ExportFolder) -> Report:
    """Parity of the patched engine against PyTorch, fidelity of patched against unpatched PyTorch; PyTorch in
    fp32 on the profile's device (a GPU profile's GPU), which the report names."""
    torch_side = torch_runners(ctx, reference_on_device=True)
    graph = folder.patched_graph(ctx.engine)
    runners = [torch_side["torch_patched"], make_runner(graph, ctx.engine), torch_side["torch_baseline"]]
    feeds = ctx.feeds()
    batches = f" in {len(feeds)} batches of {ctx.recipe.batch}" if ctx.recipe.batch > 1 else ""
    e, outputs, names = ctx.engine, ctx.models.family.outputs, [p.name for p in ctx.photos]
    terms, rows = [], []
    with progress.step(f"Running {len(ctx.photos)} images{batches} through PyTorch (baseline, patched) and the "
                       f"{ctx.engine.name} engine"):
        for name, image in zip(names, stream_all(runners, feeds, len(ctx.photos))):
            patched = image[runners[0].name]
            terms.append(parity_terms(image[runners[1].name], patched))
            rows.append(fidelity_row(name, patched, image[runners[2].name], dict(outputs)))
    par = parity_of(terms, e.cosine_min, e.max_abs, e.max_abs_bounds(outputs), e.max_abs_rel)
    fid = fidelity_of(rows)
    if not ctx.pretrained:
        fid["structure_check_only"] = STRUCTURE_ONLY
    device = "gpu" if torch_side["torch_patched"].on_cuda else "cpu"
    return Report(parity=dataclasses.replace(par, engine_model=graph.name, reference_device=device), fidelity=fid)


def flops(ctx: Context) -> Report:
    """GFLOPs of baseline and patched (and of each part a family names), counted on the PyTorch models."""
    with progress.step("Counting FLOPs of baseline and patched models"):
        parts = ctx.models.family.parts
        base = count_gflops_fast(ctx.models.baseline, ctx.example[:1], parts)  # per image, at any batch
        patched = count_gflops_fast(ctx.models.patched, ctx.example[:1], parts)
    counted: dict[str, float | None] = {"baseline": base.total, "patched": patched.total,
                                        "clustering": patched.clustering, "ratio": patched.total / base.total}
    for (label, b), (_, p) in zip(base.parts, patched.parts):
        counted |= {f"{label}_baseline": b, f"{label}_patched": p, f"{label}_ratio": p / b if b else None}
    return Report(gflops=counted)


def latency(ctx: Context, folder: ExportFolder, with_torch: bool = False) -> Report:
    """Median latency of the baseline and patched engines (the graph before the passes too, for an fp32 profile;
    the PyTorch models on the profile's device too, with `with_torch`), all interleaved in one run."""
    extra = torch_runners(ctx, on_profile=True) if with_torch else {}
    return Report(latency=engines.time_engines(folder, ctx.engine, feed={INPUT_NAME: ctx.example.numpy()},
                                               extra=extra))


def profile(ctx: Context, folder: ExportFolder, wanted: bool = True) -> Report:
    """`bench --profile`: the engines' per-node profile on the example input, after the timed runs (nothing
    when not `wanted`)."""
    if not wanted:
        return Report()
    return engines.profile_engines(folder, ctx.engine, feed={INPUT_NAME: ctx.example.numpy()})


def backend_info(ctx: Context) -> JsonObject:
    return engines.backend_info(ctx.engine, {"torch": torch.__version__})


def memory_need(ctx: Context) -> Need:
    """The models' weights and the larger of their forwards' activations at the export batch (a meta-device count,
    about a second; when a model cannot run on the meta device, its weights stand in for its activations)."""
    weights = weight_bytes(ctx.models.baseline)
    acts = [activation_bytes(m, ctx.example) for m in (ctx.models.baseline, ctx.models.patched)]
    return Need(weights, max(a if a is not None else weights for a in acts))


def plan_memory(ctx: Context, command: str, steps: tuple[str, ...], torch_models: bool = True,
                apart: bool = False) -> JsonObject:
    """The command's estimated peak, said on stderr; a command that would not fit is refused here, before any
    export or session. Returns the estimate for report.json's memory section (an export records it too, for
    the commands that read the export). apart: export, passes and check run in fresh processes (`run` on a big
    model)."""
    need = memory_need(ctx)
    lean = need.weights >= LEAN_GRAPH_BYTES
    estimate = estimate_memory(need, f"hgdeploy {command} {ctx.recipe.name}", ctx.models.preprocess.size, steps,
                               sessions(ctx.engine, lean), torch_models, lean=lean, apart=apart)
    progress.info(estimate.pop("said"), markup=False)
    return estimate


def measured_memory(estimate: JsonObject) -> Report:
    """report.json's memory section: the estimate, each step's measured peak, the command's peak: this process's,
    or, where a step ran in a process of its own, that process's peak with what this one held meanwhile."""
    own = peak_rss_mb() / 1024
    children: JsonObject = {"processes": [{"step": c.step, "peak_gb": round(c.peak_gb, 2),
                                           "with_the_command_gb": round(c.summed_gb, 2)} for c in CHILD_PEAKS]}
    peak = max([own, *(c.summed_gb for c in CHILD_PEAKS)])
    return Report(memory=estimate | {"steps": STEPS.to_json(), "peak_gb": round(peak, 2)}
                  | (children if CHILD_PEAKS else {}))
