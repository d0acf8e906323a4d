"""Throughput against batch size: `hgdeploy bench --batch 1,8,32` times baseline and patched at each batch, and this
module turns those timings into rows, a table's cells and a plot of the speed-up against the batch.

Token clustering pays where the device is busy: at batch 1 a small model leaves a GPU idle, so fewer tokens
barely mean less time; at larger batches the saved FLOPs become saved milliseconds. Nothing here runs a model.
"""

from __future__ import annotations

import io

from hgdeploy.core.files import JsonObject
from hgdeploy.measure.results import Latency


def batch_row(latency: Latency) -> JsonObject:
    """One batch size: medians per batch, images/s and the speed-ups (patched over baseline) with their
    intervals."""
    ci = latency.speedup_ci
    row: JsonObject = {"batch": latency.batch, "latency_ms": dict(latency.median_ms),
                       "images_per_s": dict(latency.images_per_s), "speedup": latency.speedup,
                       "speedup_ci": None if ci is None else list(ci)}
    if latency.speedup_torch is not None:
        torch_ci = latency.interval("torch_baseline", "torch_patched")
        row["speedup_torch"] = latency.speedup_torch
        row["speedup_torch_ci"] = None if torch_ci is None else list(torch_ci)
    return row


def parse_batches(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]: positive, distinct, in the order given; ValueError naming the problem."""
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch {text!r}: give batch sizes as integers separated by commas, e.g. 1,8,32") from None
    if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise ValueError(f"--batch {text!r}: give distinct batch sizes of at least 1, e.g. 1,8,32")
    return batches


def render_plot(rows: list[JsonObject], engine: str) -> bytes:
    """PNG: speed-up (baseline / patched) against the batch, log-scaled batch axis, the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["speedup"] for r in rows], marker="o", label=f"{engine} engine")
    if all("speedup_torch" in r for r in rows):
        ax.plot(batches, [r["speedup_torch"] for r in rows], marker="s", linestyle="--", label="PyTorch")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="no gain")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (images per run)")
    ax.set_ylabel("speed-up, baseline / patched")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
