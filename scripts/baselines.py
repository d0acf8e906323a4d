"""Clustering against the paper's parameter-free baseline at equal cost, on the default model, with the tool.

For each plan (alpha, grid) the same model is patched twice: token clustering + reconstruction (the
method) and average pooling + bilinear upsampling at the same alpha, grid and reconstruction layer
(`cluster.method = "pool_bilinear"`, the paper's Table 4/5 baseline). Both are scored against the
unpatched model on the bundled photos (final-token cosine, heatmap IoU) and their GFLOPs counted.
Writes scripts/results/baselines.json and the README block between the baselines markers.

    python scripts/baselines.py            # README block
    python scripts/baselines.py --check    # print only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import publish

from hgdeploy import build_models, count_gflops_fast, exit_code, fidelity, load_recipe, sample_photos, to_batch

REPO = Path(__file__).resolve().parents[1]

PLANS = [(6, "28x28"), (6, "24x24"), (6, "20x20"), (4, "28x28"), (8, "24x24")]
RESULTS = REPO / "scripts" / "results" / "baselines.json"


def score(overrides: list[str], photos: list) -> dict:
    models = build_models(load_recipe(None, overrides), "cpu")
    batch = to_batch(photos, models.preprocess)
    names = models.family.output_names
    with torch.no_grad():
        outs = {which: [dict(zip(names, (o.numpy() for o in model(batch[i:i + 1])))) for i in range(len(batch))]
                for which, model in (("patched", models.patched), ("baseline", models.baseline))}
    fid = fidelity(outs["patched"], outs["baseline"], dict(models.family.outputs), [p.name for p in photos])
    g = count_gflops_fast(models.patched, batch[:1])
    return {"gflops": g.total, "cosine_mean": fid["cosine_mean"], "heatmap_iou": fid["heatmap_iou"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the block, do not write README")
    args = parser.parse_args()
    photos = sample_photos()
    rows = []
    for alpha, grid in PLANS:
        plan = [f"cluster.alpha={alpha}", f"cluster.grid={grid}"]
        row = {"alpha": alpha, "grid": grid, "cluster": score(plan, photos),
               "pool_bilinear": score(plan + ["cluster.method=pool_bilinear"], photos)}
        print(f"alpha {alpha} grid {grid}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    lines = ["| alpha, grid | GFLOPs clustering / pool | cosine clustering / pool | heatmap IoU clustering / pool |",
             "|---|---:|---:|---:|"]
    for r in rows:
        c, p = r["cluster"], r["pool_bilinear"]
        lines.append(f"| {r['alpha']}, {r['grid']} | {c['gflops']:.1f} / {p['gflops']:.1f} | "
                     f"{c['cosine_mean']:.4f} / {p['cosine_mean']:.4f} | {c['heatmap_iou']:.3f} / {p['heatmap_iou']:.3f} |")
    wins = sum(r["cluster"]["cosine_mean"] > r["pool_bilinear"]["cosine_mean"] for r in rows)
    lines += ["", f"Clustering has the higher cosine in {wins} of {len(rows)} plans. Produced by `python "
                  f"scripts/baselines.py` on the default recipe (518x518, the 8 bundled photos, PyTorch on the CPU, "
                  f"torch {torch.__version__}); GFLOPs: one multiply-add = one FLOP."]
    publish("\n".join(lines), "baselines", REPO / "README.md", RESULTS, rows, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "baselines.py"))
