"""report.json (the contract other tools read) and report.md (the same numbers for people)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from hgdeploy.core.files import JsonObject, to_json, write_atomic
from hgdeploy.measure.timing import CI_LEVEL, MIN_ROUNDS


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
                 ("speedup (baseline / patched)", _fmt(report.get("speedup"), 3)),
                 (f"speedup {round(100 * CI_LEVEL)} % confidence interval",
                  None if report.get("speedup_ci") is None
                  else f"{report['speedup_ci'][0]:.3f}–{report['speedup_ci'][1]:.3f}")]
        load = report.get("load") or {}
        if load.get("start") is not None or load.get("end") is not None:
            rows.append(("load average at start / end of timing (CPUs)",
                         f"{_fmt(load.get('start'), 2)} / {_fmt(load.get('end'), 2)} ({load.get('cpus')})"
                         + (" busy" if load.get("busy") else "")))
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
        passes = passes_verdict(report)
        if passes:
            lines.append(passes)
    return lines


# ---------------------------------------------------------------------------------------------- verdicts
# One rule words every speed-up (run, bench, optimize, tune, the GPU report): "faster" only when the whole
# confidence interval of the speed-up (timing.speedup_interval: a bootstrap of the interleaved rounds' ratios)
# lies above 1, "slower" only when it lies below 1, else "no measurable change". The interval is what this run's
# rounds can tell; a busy machine or a wide interval gets a warning that the figure is unreliable.

WIDE_CI = 0.10  # an interval wider than ±10 % of the speed-up: the rounds disagree too much to rely on


def speed_band(ci: tuple[float, float] | list[float] | None) -> str:
    """"faster" (the interval's lower end clears 1), "slower" (its upper end is below 1), "noise" (it holds 1:
    no measurable change) or "unknown" (no interval: too few rounds): the one reading of a speed-up that every
    verdict words."""
    if ci is None:
        return "unknown"
    low, high = ci
    if low > 1.0:
        return "faster"
    return "slower" if high < 1.0 else "noise"


def ci_text(ci: tuple[float, float] | list[float] | None) -> str:
    """"95 % CI 1.08–1.16", or that there were too few rounds for one."""
    if ci is None:
        return f"no confidence interval: fewer than {MIN_ROUNDS} rounds"
    return f"{round(100 * CI_LEVEL)} % CI {ci[0]:.2f}–{ci[1]:.2f}"


def speedup_text(speedup: float, ci: tuple[float, float] | list[float] | None, digits: int = 2) -> str:
    """"1.12x (95 % CI 1.08–1.16)": a speed-up is never worded without its interval."""
    return f"{speedup:.{digits}f}x ({ci_text(ci)})"


def relative_speed(speedup: float, ci: tuple[float, float] | list[float] | None,
                   other: str = "the unpatched model", digits: int = 3) -> str:
    """A speed-up against `other` in words, by the one rule: "1.242x faster than the unpatched model (95 % CI
    1.20–1.28)" only when the interval clears 1, else "no measurable change" or "slower"."""
    figure, band = f"{speedup:.{digits}f}x", speed_band(ci)
    if band == "faster":
        return f"{figure} faster than {other} ({ci_text(ci)})"
    if band == "slower":
        return f"{figure} {other}'s speed: slower ({ci_text(ci)})"
    if band == "noise":
        return f"{figure} {other}'s speed: no measurable change ({ci_text(ci)} holds 1)"
    return f"{figure} {other}'s speed ({ci_text(ci)})"


def band_words(ci: tuple[float, float] | list[float] | None) -> str:
    """What the interval lets one say, in a few words: for tables and one-line summaries."""
    return {"faster": "faster", "slower": "slower", "noise": "no measurable change",
            "unknown": "too few rounds to tell"}[speed_band(ci)]


def wide(ci: tuple[float, float] | list[float] | None, speedup: float | None) -> bool:
    """Is the interval wider than ±WIDE_CI of the speed-up?"""
    return ci is not None and speedup is not None and (ci[1] - ci[0]) / 2 > WIDE_CI * speedup


def reliability(report: JsonObject) -> str | None:
    """A warning that the speed-up is unreliable, where it is: the machine was busy while it was timed (its load
    average, less this process's own share, above its CPU count less a half), or the interval is wide."""
    reasons = []
    load = report.get("load") or {}
    if load.get("busy"):
        readings = " and ".join(f"{v:.1f} at the {when}" for when, v in (("start", load.get("start")),
                                                                         ("end", load.get("end"))) if v is not None)
        reasons.append(f"the machine is busy: its load average was {readings} of the timing on {load.get('cpus')} "
                       f"CPUs, of which this process accounts for about {load.get('own_cores', 0):.1f}")
    ci, speedup = report.get("speedup_ci"), report.get("speedup")
    if wide(ci, speedup):
        reasons.append(f"the interval is wide (±{50 * (ci[1] - ci[0]) / speedup:.0f} %, more than "
                       f"±{100 * WIDE_CI:.0f} %): the rounds disagree")
    if not reasons:
        return None
    return ("The figure is unreliable: " + "; ".join(reasons)
            + ". Rerun on an idle machine, or with more rounds ([bench] runs in the engine profile).")


class QualityBudget(Protocol):
    """A fidelity budget (`hgdeploy tune`'s `Budget` is one): the fidelity summary key it reads, its direction
    (">=" or "<="), its bound, and the rule it is met by (on a mean: the one-sided confidence bound of the mean
    over the images)."""

    op: str
    value: float
    confidence: float

    @property
    def key(self) -> str: ...

    def bound(self, fidelity: dict[str, Any]) -> float | None: ...

    def met(self, fidelity: dict[str, Any]) -> bool: ...


def quality(fidelity: JsonObject | None, budget: QualityBudget) -> JsonObject:
    """report.json's quality: the fidelity figure a budget reads, its confidence bound and whether it meets the
    budget (`measured` false without a fidelity: `bench` does not measure one)."""
    out: JsonObject = {"budget": str(budget), "key": budget.key, "op": budget.op, "threshold": budget.value,
                       "measured": fidelity is not None}
    if fidelity is None:
        return out
    value = fidelity.get(budget.key)
    out["value"] = value
    if value is None:
        return out | {"met": None}
    bound = budget.bound(fidelity)
    out |= {"bound": None if bound is None else float(bound), "confidence": budget.confidence,
            "mean_met": bool(value >= budget.value if budget.op == ">=" else value <= budget.value),
            "met": bool(budget.met(fidelity))}
    if fidelity.get("structure_check_only"):
        out["structure_check_only"] = True
    return out


def _metric_name(key: str) -> str:
    return "cosine mean" if key == "cosine_mean" else key.replace("_", " ")


def quality_clause(report: JsonObject) -> str | None:
    """Fidelity against the budget, as a clause that goes in the verdict's sentence (None without a budget)."""
    q = report.get("quality")
    if not q:
        return None
    budget, name = q["budget"], _metric_name(q["key"])
    if not q.get("measured"):
        return f"fidelity is not measured by bench: `hgdeploy check` or `run` states it against the budget {budget}"
    value = q.get("value")
    if value is None:
        return f"this model's fidelity has no {name} to hold against the budget {budget}"
    if q.get("structure_check_only"):
        note = (report.get("fidelity") or {}).get("structure_check_only") or "random weights"
        return f"fidelity {name} {value:.4f} is a structure check only, not held against the budget {budget} — {note}"
    if q.get("met"):
        return f"fidelity {name} {value:.4f} meets the budget {budget}"
    if q.get("mean_met"):
        return (f"fidelity {name} {value:.4f} meets the budget {budget} on these images only: its one-sided "
                f"{100 * q['confidence']:.0f} % confidence bound, {q['bound']:.4f}, does not (the rule `hgdeploy tune` "
                "keeps)")
    return f"fidelity {name} {value:.4f} is {'below' if q.get('op') == '>=' else 'above'} the budget {budget}"


def quality_verdict(report: JsonObject) -> str | None:
    """The quality clause as a sentence of its own: what `hgdeploy check` (no timing) ends with."""
    clause = quality_clause(report)
    return None if clause is None else clause[0].upper() + clause[1:] + "."


def _where(report: JsonObject) -> str:
    backend = report.get("backend") or {}
    machine = backend.get("machine") or {}
    gpu = (backend.get("versions") or {}).get("gpu")
    return (f"{backend.get('name', 'this engine')} on "
            + (gpu if backend.get("device") == "gpu" and gpu else f"this CPU, {machine.get('cpu_count', '?')} cores"))


def speed_verdict(report: JsonObject) -> str | None:
    """The verdict a user wants before any table: whether the patched engine is faster here, with the speed-up's
    interval (faster only when all of it clears 1), fidelity against the budget in the same sentence, and a
    warning where the timing is unreliable."""
    speedup = report.get("speedup")
    if speedup is None:
        return None
    ci, where = report.get("speedup_ci"), _where(report)
    band = speed_band(ci)
    if band == "faster":
        head = f"Faster here: the patched engine runs {speedup:.2f}x the baseline's speed ({ci_text(ci)}; {where})"
        advice = ""
    elif band == "noise":
        head = f"No measurable change here: {speedup:.2f}x, and its {ci_text(ci)} holds 1 ({where})"
        advice = "`hgdeploy tune` searches for a faster plan within a quality budget."
    elif band == "slower":
        head = (f"No gain here: the patched engine is slower than the baseline, {speedup:.2f}x ({ci_text(ci)}; "
                f"{where})")
        advice = "Keep the baseline, or let `hgdeploy tune` search for a faster plan within a quality budget."
    else:
        runs = ((report.get("latency") or {}).get("baseline") or {}).get("runs", "?")
        head = f"Too few timing rounds to tell: {speedup:.2f}x by the medians of {runs} interleaved rounds ({where})"
        advice = f"A confidence interval needs at least {MIN_ROUNDS} rounds ([bench] runs in the engine profile)."
    clause = quality_clause(report)
    if clause:
        missed = (report.get("quality") or {}).get("met") is False
        head += f"; {'but ' if band == 'faster' and missed else ''}{clause}"
    return " ".join(part for part in (head + ".", advice, reliability(report)) if part)


def passes_verdict(report: JsonObject) -> str | None:
    """What the graph passes did to the patched graph's speed, by the same rule (an fp32 profile times the graph
    before them beside the one after); None where it was not timed."""
    speedup = report.get("passes_speedup")
    if speedup is None:
        return None
    ci = report.get("passes_speedup_ci")
    band, figure = speed_band(ci), f"{speedup:.2f}x the speed of the graph before them ({ci_text(ci)})"
    text = {"faster": f"The graph passes made the patched graph faster: {figure}.",
            "slower": f"The graph passes made the patched graph slower here: {figure}; on this engine the graph "
                      "before them (patched.onnx) is the faster one.",
            "noise": f"The graph passes made no measurable change to the patched graph's speed: {figure}.",
            "unknown": f"The graph passes' effect on speed: {figure}."}[band]
    if wide(ci, speedup):
        text += " The interval is wide: the figure is unreliable."
    return text


def render_summary(report: JsonObject) -> str:
    """The summary table and the graph passes: what `hgdeploy run` prints."""
    lines = ["## Summary", ""]
    verdict = speed_verdict(report) or quality_verdict(report)
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

