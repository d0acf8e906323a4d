"""report.json (the contract other tools read) and report.md (the same numbers for people)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hgdeploy.core.files import JsonObject, to_json, write_atomic


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "—" if value is None else str(value)


FIDELITY_LABELS = {
    "cosine_mean": "fidelity cosine mean (patched vs original)", "cosine_min": "fidelity cosine min",
    "heatmap_iou": "heatmap IoU@0.5 mean", "heatmap_iou_min": "heatmap IoU@0.5 min",
    "heatmap_mae": "heatmap mean abs error", "label_agreement": "pixels with unchanged class, mean",
    "label_agreement_min": "pixels with unchanged class, worst image",
    "depth_rel_error": "depth mean abs error / mean depth, mean", "depth_rel_error_max": "depth relative error, worst image",
    "top1_agreement": "top-1 class unchanged, share of images",
}


def _summary_rows(report: JsonObject) -> list[tuple[str, str]]:
    backend = report.get("backend")
    rows = [("backend", backend.get("name") if isinstance(backend, dict) else None)]
    if "weights" in report:
        rows.append(("weights", report["weights"]["source"]))
    if "parity" in report:
        p = report["parity"]
        where = f", PyTorch fp32 on the {p['reference_device']}" if p.get("reference_device") else ""
        rows += [(f"parity cosine min (engine vs PyTorch{where})", _fmt(p["cosine_min"], 6)),
                 ("parity max abs error", f"{p['max_abs']:.3g}"),
                 ("parity passed", "yes" if p["passed"] else "**NO**")]
    if "fidelity" in report:
        f = report["fidelity"]
        tag = " (structure check only: random weights)" if "structure_check_only" in f else ""
        rows += [(label + tag, _fmt(f[key])) for key, label in FIDELITY_LABELS.items() if key in f]
        if f.get("heatmap_iou_undefined"):
            rows.append(("heatmap IoU undefined (too few salient pixels), images", str(f["heatmap_iou_undefined"])))
    if "gflops" in report:
        g = report["gflops"]
        rows += [("GFLOPs baseline", _fmt(g["baseline"], 2)), ("GFLOPs patched (incl. clustering)", _fmt(g["patched"], 2)),
                 ("GFLOPs clustering + reconstruction", _fmt(g["clustering"], 3)),
                 ("GFLOPs ratio patched / baseline", _fmt(g["patched"] / g["baseline"], 3))]
    if "latency_ms" in report:
        lat = report["latency_ms"]
        rows += [("latency baseline (median ms)", _fmt(lat["baseline"], 1)),
                 ("latency patched (median ms)", _fmt(lat["patched"], 1)),
                 ("speedup (baseline / patched)", _fmt(report.get("speedup"), 3))]
    return [(k, v) for k, v in rows if v is not None]


def _passes_section(report: JsonObject) -> list[str]:
    if "optimize" not in report:
        return []
    o = report["optimize"]
    lines = ["", "## Graph passes (patched.onnx -> patched.opt.onnx)", ""]
    lines += [f"- {note}" for note in o["passes"]]
    lines += ["", f"Nodes {o['nodes']['before']} -> {o['nodes']['after']}; GFLOPs {o['gflops']['before']['total']:.3f} -> "
              f"{o['gflops']['after']['total']:.3f} (clustering + reconstruction {o['gflops']['before']['clustering']:.3f} -> "
              f"{o['gflops']['after']['clustering']:.3f})."]
    if "lint" in report:
        lint = report["lint"]
        lines.append(f"TensorRT {lint['trt_major']} parser lint of {lint['model']}: "
                     + ("clean." if lint["clean"] else f"{len(lint['findings'])} finding(s): " + "; ".join(lint["findings"])))
    if "patched_unoptimized" in report.get("latency_ms", {}):
        lines.append(f"Latency of the patched graph before the passes: {report['latency_ms']['patched_unoptimized']:.1f} ms.")
    return lines


# A speed-up inside 1 ± this is reported as no measurable difference, not as a gain or a loss. Measured: the
# default recipe's patched.fp16.onnx timed against itself as bench does (ort-cpu-fp16, 15 interleaved runs),
# six times on 2 CPU cores, gave 0.988-1.011; the band leaves room for busier machines.
SPEED_NOISE = 0.03


def speed_band(speedup: float) -> str:
    """"faster", "noise" (inside 1 ± SPEED_NOISE) or "slower": the one reading of a speed-up that every verdict
    (run, bench, the GPU report) words."""
    if speedup >= 1 + SPEED_NOISE:
        return "faster"
    return "noise" if speedup > 1 - SPEED_NOISE else "slower"


def speed_verdict(report: JsonObject) -> str | None:
    """One sentence on whether the patched engine is faster here, read off the measured speed-up: the answer a
    user wants before any table, including an honest "no gain here"."""
    speedup, backend = report.get("speedup"), report.get("backend") or {}
    if speedup is None:
        return None
    machine = backend.get("machine") or {}
    gpu = (backend.get("versions") or {}).get("gpu")
    where = (f"{backend.get('name', 'this engine')} on "
             + (gpu if backend.get("device") == "gpu" and gpu else f"this CPU, {machine.get('cpu_count', '?')} cores"))
    band = speed_band(speedup)
    if band == "faster":
        return f"Faster here: the patched engine runs {speedup:.2f}x the baseline's speed ({where})."
    if band == "noise":
        return (f"No measurable gain here: {speedup:.2f}x, inside the ±{SPEED_NOISE:.0%} timing noise ({where}); "
                "`hgdeploy tune` searches for a faster plan within a quality budget.")
    return (f"No gain here: the patched engine is slower than the baseline, {speedup:.2f}x ({where}); keep the "
            "baseline, or let `hgdeploy tune` search for a faster plan within a quality budget.")


def render_summary(report: JsonObject) -> str:
    """The summary table and the graph passes: what `hgdeploy run` prints."""
    lines = ["## Summary", ""]
    verdict = speed_verdict(report)
    if verdict:
        lines += [verdict, ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    note = report.get("fidelity", {}).get("structure_check_only")
    if note:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines + _passes_section(report))


def render_markdown(report: JsonObject) -> str:
    """A readable summary: plan, parity, fidelity, cost, latency, per-image rows."""
    lines = [f"# hgdeploy report: {report.get('recipe', {}).get('name', '?')}", ""]
    plan = report.get("plan") or {}
    if plan:
        lines += ["## Plan", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in plan.items()]
        lines.append("")
    lines.append(render_summary(report))
    rows = report.get("fidelity", {}).get("per_image", [])
    if rows:
        cols = [c for c in rows[0] if c != "image"]
        lines += ["", "## Fidelity per image", "", "| image | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {r['image']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "Cosine: mean over tokens of the per-token cosine of the final patch tokens. Heatmap IoU: of the",
              "pixels above 0.5, only where the unpatched heatmap has at least 1 % of them (— elsewhere). GFLOPs: one",
              "multiply-add = one FLOP (fvcore's convention), batch 1. Latency: medians of interleaved runs after warm-up.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: JsonObject) -> None:
    write_atomic(out / "report.json", to_json(report))
    write_atomic(out / "report.md", render_markdown(report))

