"""eval.json (for tools), eval.md (metric x {unpatched, patched, engine} with deltas; `hgdeploy eval` prints the
same tables from the same rows) and eval.png (the worst and the median image side by side: image | ground truth |
unpatched | patched | engine | where the engine differs from the unpatched model, each row titled with its
agreement). No torch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import imgviz
import numpy as np
from PIL import Image, ImageDraw

from hgdeploy.core.files import to_json, write_atomic, write_atomic_bytes
from hgdeploy.evaluation.metrics import LOWER_IS_BETTER
from hgdeploy.evaluation.scoring import AGREEMENTS, MODELS

PANEL_HEIGHT = 180
ROW_TITLE_HEIGHT = 18
AGREEMENT_LABELS = {"patched": "patched vs unpatched", "engine": "engine vs unpatched",
                    "engine_vs_patched": "engine vs patched"}


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _delta(a: Any, b: Any) -> str:
    return "—" if a is None or b is None else f"{b - a:+.4f}"


TRUTH_TITLE = "Against the ground truth"
AGREEMENT_TITLE = "Agreement (one model's predictions taken as the other's labels)"


def truth_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of metric x {unpatched, patched, engine} with the deltas against the unpatched model, every
    value as eval.md and stdout both show it (None for a layout without ground truth)."""
    metrics = report.get("metrics")
    if not metrics:
        return None
    rows = []
    for name in metrics["unpatched"]:
        u, p, e = (metrics[m][name] for m in MODELS)
        arrow = " (lower is better)" if name in LOWER_IS_BETTER else ""
        rows.append([f"{name}{arrow}", _fmt(u), _fmt(p), _fmt(e), _delta(u, p), _delta(u, e)])
    return ["metric", "unpatched", "patched", "engine", "Δ patched", "Δ engine"], rows


def agreement_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the agreement between the models: patched vs unpatched, engine vs unpatched, engine vs
    patched."""
    agreement = report["agreement"]
    return (["metric", *(AGREEMENT_LABELS[a] for a in AGREEMENTS)],
            [[n, *(_fmt(agreement[a].get(n)) for a in AGREEMENTS)] for n in agreement["patched"]])


def gate_sentence(report: dict[str, Any], markdown: bool = True) -> str:
    """The task gate: the engine's agreement with patched PyTorch held to the profile's task_agreement_min."""
    g = report["gate"]
    failed = "**FAILED**" if markdown else "FAILED"
    verdict = (f">= {g['task_agreement_min']}: " + ("passed" if g["passed"] else failed)
               if g["task_agreement_min"] is not None else "(no parity.task_agreement_min in this profile)")
    return f"Task gate: {g['metric']} = {_fmt(g['value'])} {verdict}."


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def tables(report: dict[str, Any], heading: str = "##") -> list[str]:
    """Markdown: metric x {unpatched, patched, engine} with deltas, the agreement table and the task gate
    (eval.md's head; scripts/readme_eval.py puts the same into README, `hgdeploy eval` prints the same tables)."""
    lines: list[str] = []
    truth = truth_table(report)
    if truth is not None:
        lines += [f"{heading} {TRUTH_TITLE}", "", *_markdown_table(*truth), ""]
    lines += [f"{heading} {AGREEMENT_TITLE}", "", *_markdown_table(*agreement_table(report))]
    lines += ["", gate_sentence(report), ""]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The metrics table, the agreement table, the gate, how it was run and scored, the per-class IoU."""
    d, backend = report["dataset"], report.get("backend", {})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(backend.get("versions", {}).items()))
    lines = [f"# hgdeploy eval: {report['recipe']['name']} on {d['path']} ({d['layout']}, {d['images']} images)", "",
             f"Engine: {backend.get('name', '?')} ({report.get('engine_model', '?')}) on the {backend.get('device', '?')}; "
             f"{versions}. PyTorch (unpatched and patched, fp32): on the {report.get('torch_device', 'cpu')}.", ""]
    if report.get("structure_check_only"):
        lines += [f"Note: {report['structure_check_only']}.", ""]
    lines += tables(report)
    lines += ["## How", "", f"- Inference: {d['inference']}.", f"- Scoring: {d['scoring']}.",
              f"- Memory (resident): {report['memory']['rss_mb_after_first_image']:.0f} MB after the first image, "
              f"{report['memory']['rss_mb_after_last_image']:.0f} MB after the last; peak "
              f"{report['memory']['peak_rss_mb']:.0f} MB.", ""]
    per_class = report.get("per_class") or []
    if per_class:
        lines += ["## IoU per class (percent)", "", "| class | unpatched | patched | engine | Δ engine |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['class']} | {_fmt(r['unpatched'])} | {_fmt(r['patched'])} | {_fmt(r['engine'])} | "
                  f"{_delta(r['unpatched'], r['engine'])} |" for r in per_class]
        lines.append("")
    if report.get("figure"):
        lines += [f"![worst and median image]({report['figure']})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figure


def _colour(kind: str, value: np.ndarray, span: tuple[float, float], ignore: np.ndarray | None = None) -> np.ndarray:
    """A prediction or ground truth as RGB: labels in imgviz's colour map, depth in jet over a shared span,
    heatmaps in grey. Ignored pixels are black."""
    if kind == "segmentation":
        rgb = imgviz.label2rgb(value.astype(np.int32))
    elif kind == "depth":
        if hasattr(imgviz, "colorize"):  # imgviz 2.1 renamed depth2rgb
            rgb = imgviz.colorize(value.astype(np.float32), vmin=span[0], vmax=span[1], cmap="jet")
        else:
            rgb = imgviz.depth2rgb(value.astype(np.float32), min_value=span[0], max_value=span[1])
    else:
        grey = value.astype(np.float32) / (255.0 if value.dtype == np.uint8 else 1.0)
        rgb = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if ignore is not None:
        rgb = rgb.copy()
        rgb[ignore] = 0
    return rgb


def _panel(rgb: np.ndarray, caption: str) -> np.ndarray:
    img = Image.fromarray(rgb)
    img = img.resize((max(1, round(img.width * PANEL_HEIGHT / img.height)), PANEL_HEIGHT), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, PANEL_HEIGHT + 16), "white")
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill="black")
    return np.asarray(canvas)


def _truth_panel(kind: str, target: Any, span: tuple[float, float]) -> np.ndarray | None:
    if target is None:
        return None
    if kind == "segmentation":
        labels, ignore = target
        return _colour(kind, labels, span, ignore)
    if kind == "depth":
        depth, valid = target
        return _colour(kind, depth, span, ~valid)
    return _colour(kind, target[0].astype(np.uint8) * 255, span)


class FigureRow(NamedTuple):
    """One picked image of eval.png: why it was picked (`label`, by `metric`: the per-image agreement with the
    unpatched model it was ranked by), the image, its ground truth, each model's prediction as scored, and that
    metric for the patched model and the engine against the unpatched one."""

    label: str
    sample: Any
    image: Any
    target: Any
    preds: dict[str, np.ndarray]
    metric: str
    agreement: dict[str, float | None]  # "patched", "engine" -> the metric against the unpatched model


def row_title(row: FigureRow, difference_summary: str = "") -> str:
    """The line above a row: which image and why, its metric against the unpatched model, and what the
    difference map shows in numbers."""
    values = ", ".join(f"{AGREEMENT_LABELS[a]} {_fmt(row.agreement.get(a))}" for a in ("patched", "engine"))
    summary = f"; difference map: {difference_summary}" if difference_summary else ""
    return f"{row.label} image by engine vs unpatched {row.metric}: {row.sample.stem} ({row.metric}: {values}{summary})"


def difference(kind: str, engine: np.ndarray, unpatched: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Where the engine's prediction differs from the unpatched model's, as RGB (white: the same; red: differs,
    the deepest red at the largest difference), its caption, and its summary in numbers: the share of pixels whose
    label changed, or the mean and largest absolute difference (metres for depth, 0..1 for a saliency map)."""
    if kind == "segmentation":
        amount = (engine != unpatched).astype(np.float32)
        caption, summary = "engine != unpatched", f"{amount.mean():.1%} of pixels changed label"
    else:
        unit = 255.0 if engine.dtype == np.uint8 else 1.0
        gap = np.abs(engine.astype(np.float64) - unpatched.astype(np.float64)) / unit
        amount = (gap / gap.max()).astype(np.float32) if gap.max() > 0 else np.zeros(gap.shape, np.float32)
        caption, summary = "|engine - unpatched|", f"mean {gap.mean():.3g}, max {gap.max():.3g} (deepest red)"
    fade = np.round(255 * (1 - amount)).astype(np.uint8)
    return np.stack([np.full_like(fade, 255), fade, fade], axis=-1), caption, summary


def render_figure(rows: list[FigureRow], kind: str) -> bytes:
    """One row per picked image, under its title (row_title): image | ground truth | unpatched | patched | engine |
    where the engine differs from the unpatched model; as PNG bytes."""
    drawn = []
    for row in rows:
        preds = row.preds
        values = np.concatenate([preds[m].ravel() for m in MODELS]).astype(np.float64)
        span = (float(np.percentile(values, 2)), float(np.percentile(values, 98))) if kind == "depth" else (0.0, 1.0)
        cells = [_panel(np.asarray(row.image), "image")]
        truth = _truth_panel(kind, row.target, span)
        if truth is not None:
            cells.append(_panel(truth, "ground truth"))
        cells += [_panel(_colour(kind, preds[m], span), m) for m in MODELS]
        rgb, caption, summary = difference(kind, preds["engine"], preds["unpatched"])
        cells.append(_panel(rgb, caption))
        body = np.concatenate(cells, axis=1)
        title = Image.new("RGB", (body.shape[1], ROW_TITLE_HEIGHT), "white")
        ImageDraw.Draw(title).text((2, 3), row_title(row, summary), fill="black")
        drawn.append(np.concatenate([np.asarray(title), body], axis=0))
    width = max(r.shape[1] for r in drawn)
    drawn = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in drawn]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(drawn, axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write(stage: Path, report: dict[str, Any], panels: list[FigureRow], kind: str) -> None:
    """eval.png (when there is an image to show), eval.json and eval.md into the staging folder."""
    if panels:
        write_atomic_bytes(stage / "eval.png", render_figure(panels, kind))
        report["figure"] = "eval.png"
    write_atomic(stage / "eval.json", to_json(report))
    write_atomic(stage / "eval.md", render_markdown(report))
