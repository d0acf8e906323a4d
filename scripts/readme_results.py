"""Regenerate the README's results tables and plot with the tool itself.

Runs `hgdeploy run --json` for the default recipe and a few plans around it, and `hgdeploy bench
--json` (torch eager and ONNX Runtime, interleaved) for the default recipe; keeps every report
under runs/readme/, draws scripts/results/latency_fidelity.png (latency and fidelity against
GFLOPs) and rewrites the block between the README's results markers.
Usage: python scripts/readme_results.py [--check] [--reuse]
  --check: only print the table; --reuse: rebuild the table from the reports already in runs/readme/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import replace_block, run_child

from hgdeploy import UserError, exit_code, write_atomic, write_atomic_bytes

REPO = Path(__file__).resolve().parents[1]

START, END = "<!-- results:start -->", "<!-- results:end -->"
# (label, extra CLI arguments): the default recipe first, then the same model with other plans.
CONFIGS = [
    ("default recipe", []),
    ("`--set cluster.grid=24x24`", ["--set", "cluster.grid=24x24"]),
    ("`--set cluster.grid=26x26`", ["--set", "cluster.grid=26x26"]),
    ("`--set cluster.alpha=7`", ["--set", "cluster.alpha=7"]),
    ("336 px input, 18x18, α=5", ["--set", "model.input_size=336x336", "--set", "cluster.grid=18x18",
                                  "--set", "cluster.alpha=5"]),
    ("`--set cluster.reconstruct_from=neighbourhood`", ["--set", "cluster.reconstruct_from=neighbourhood"]),
    ("fp16 graphs, `--engine ort-cpu-fp16`", ["--engine", "ort-cpu-fp16"]),
]


PLOT = REPO / "scripts" / "results" / "latency_fidelity.png"


def run(label: str, extra: list[str], out: Path, command: str = "run") -> dict:
    cmd = [sys.executable, "-m", "hgdeploy.cli", command, *extra, "--out", str(out), "--json"]
    print(f"[{label}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = run_child(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{label}: hgdeploy {command} failed with exit code {done.returncode}")
    report = json.loads(done.stdout)
    if command != "run":  # run writes its own report.json
        write_atomic(out / f"{command}.json", done.stdout)
    return report


def bench_table(r: dict) -> str:
    """torch eager vs the engine, baseline vs patched, from one interleaved `hgdeploy bench` run."""
    lat = r["latency"]
    rows = ["| runner | median ms | p90 ms |", "|---|---|---|"]
    fused = r.get("backend", {}).get("fused_attention", False)
    names = {"torch_baseline": "torch eager, baseline", "torch_patched": "torch eager, patched",
             "baseline": f"ONNX Runtime CPU, baseline{'.fused' if fused else ''}.onnx",
             "patched_unoptimized": "ONNX Runtime CPU, patched.onnx",
             "patched": "ONNX Runtime CPU, " + ("patched.fused.onnx (the graph passes' result, attention fused)" if fused
                                                else "patched.opt.onnx (after the graph passes)")}
    rows += [f"| {names[k]} | {lat[k]['median_ms']:.0f} | {lat[k]['p90_ms']:.0f} |" for k in names if k in lat]
    g = r["gflops"]
    rows.append("")
    rows.append(f"Speedup: {r['speedup']:.2f}× on ONNX Runtime, {r['speedup_torch']:.2f}× in torch eager; "
                f"GFLOPs {g['baseline']:.1f} → {g['patched']:.1f}, of which clustering + reconstruction {g['clustering']:.2f} "
                f"({100 * g['clustering'] / g['patched']:.1f} %). FLOP-predicted speedup without the clustering cost: "
                f"{g['baseline'] / (g['patched'] - g['clustering']):.2f}×. Produced by `hgdeploy bench --json` "
                "(inside `python scripts/readme_results.py`).")
    return "\n".join(rows)


def plot(rows: list[tuple[str, list[str], dict]], path: Path) -> None:
    """Latency and fidelity against GFLOPs, one point per plan plus the unpatched baseline."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_fid) = plt.subplots(1, 2, figsize=(11, 4))
    bases = {}
    for i, (label, _, r) in enumerate(rows):
        color, x, label = f"C{i}", r["gflops"]["patched"], label.replace("`", "")
        bases[r["gflops"]["baseline"]] = r["latency_ms"]["baseline"]
        ax_lat.scatter([x], [r["latency_ms"]["patched"]], color=color, label=label)
        ax_fid.scatter([x], [r["fidelity"]["cosine_mean"]], color=color, label=f"{label}: token cosine")
        ax_fid.scatter([x], [r["fidelity"]["heatmap_iou"]], color=color, marker="x", label=f"{label}: heatmap IoU")
    ax_lat.scatter(list(bases), list(bases.values()), marker="s", color="black", label="unpatched (per input size)")
    ax_lat.set(xlabel="GFLOPs (multiply-adds, batch 1)", ylabel="ONNX Runtime CPU median latency (ms)", title="Latency")
    ax_fid.set(xlabel="GFLOPs (multiply-adds, batch 1)", ylabel="patched vs unpatched", title="Fidelity")
    ax_lat.legend(fontsize=7)
    ax_fid.legend(fontsize=6)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic_bytes(path, png.getvalue())


def table(rows: list[tuple[str, list[str], dict]]) -> str:
    head = ("| plan | input | α | clusters | GFLOPs base → patched (ratio) | clustering GFLOPs | cosine mean / min "
            "| heatmap IoU mean / min | ORT CPU ms base → patched | speedup | parity cos min |")
    lines = [head, "|" + "---|" * 11]
    for label, _, r in rows:
        p, g, f, lat = r["plan"], r["gflops"], r["fidelity"], r["latency_ms"]
        lines.append(
            f"| {label} | {r['recipe']['values']['model']['input_size']} | {p['alpha']} | {p['grid']} = {p['num_clusters']} of {p['num_tokens']} "
            f"| {g['baseline']:.1f} → {g['patched']:.1f} ({g['patched'] / g['baseline']:.3f}) | {g['clustering']:.2f} "
            f"| {f['cosine_mean']:.4f} / {f['cosine_min']:.4f} | {f['heatmap_iou']:.3f} / {f['heatmap_iou_min']:.3f} "
            f"| {lat['baseline']:.0f} → {lat['patched']:.0f} | {r['speedup']:.2f}× | {r['parity']['cosine_min']:.6f} |")
    versions = rows[0][2]["backend"]["versions"]
    machine = rows[0][2]["backend"]["machine"]
    lines.append("")
    lines.append(f"Measured by `python scripts/readme_results.py` on {machine['cpu_count']} CPU cores ({machine['machine']}), "
                 f"onnxruntime {versions['onnxruntime']}, torch {versions['torch']}, on the {rows[0][2]['fidelity']['images']} "
                 "bundled sample photos. Latency: medians of interleaved runs after warm-up.")
    return "\n".join(lines)


def main() -> None:
    """Every report, then the plot, then the README block: an interrupted run leaves whole files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the table, do not touch README.md")
    parser.add_argument("--reuse", action="store_true", help="use the reports already in runs/readme/ (runs only the missing ones)")
    args = parser.parse_args()
    rows = []
    for i, (label, extra) in enumerate(CONFIGS):
        out = REPO / "runs" / "readme" / f"config{i}"
        saved = out / "report.json"
        report = json.loads(saved.read_text()) if args.reuse and saved.is_file() else run(label, extra, out)
        rows.append((label, extra, report))
    default_dir = REPO / "runs" / "readme" / "config0"  # bench times the default run's exported graphs
    saved = default_dir / "bench.json"
    bench = (json.loads(saved.read_text()) if args.reuse and saved.is_file()
             else run("bench", ["--torch"], default_dir, "bench"))
    plot(rows, PLOT)
    text = (table(rows) + "\n\n![latency and fidelity against GFLOPs](scripts/results/latency_fidelity.png)\n\n"
            + bench_table(bench))
    print(text)
    if not args.check:
        readme = REPO / "README.md"
        body = readme.read_text()
        if START not in body or END not in body:
            raise UserError(f"README.md has no {START} ... {END} markers to put the table between")
        write_atomic(readme, replace_block(body, "results", text))


if __name__ == "__main__":
    sys.exit(exit_code(main, "readme_results.py"))
