"""Score `hgdeploy eval --save-predictions` output again, independently of hgdeploy's metric code.

Plain numpy over the files as stored, to cross-check eval.json (and as a template for any other tool):

    python scripts/score_predictions.py ade20k DATASET runs/segmenter_vit_b16_ade20k/eval
    python scripts/score_predictions.py nyuv2 DATASET OUT          # or kitti

Segmentation (ade20k): one confusion matrix over every labelled pixel (stored 0 = not scored, class =
stored - 1), mIoU over the classes present in ground truth or prediction, pixel accuracy. Depth (nyuv2,
kitti): per-image errors inside the Eigen / Garg crop and the depth cap, then the mean over images.
Prints this script's figures beside eval.json's engine column, and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hgdeploy import UserError, exit_code

DEPTH = {"nyuv2": (1000.0, 10.0, (45 / 480, 471 / 480, 41 / 640, 601 / 640)),
         "kitti": (256.0, 80.0, (0.40810811, 0.99189189, 0.03594771, 0.96405229))}


def read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} not found: the dataset and the predictions must hold the same file names")
    with Image.open(path) as img:
        return np.asarray(img).astype(np.float64)


def labels(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.png"))
    if not found:
        raise UserError(f"no ground-truth PNGs in {folder}: give the dataset folder `hgdeploy eval` read")
    return found


def ade20k(dataset: Path, predictions: Path) -> dict[str, float]:
    matrix = np.zeros((150, 150))
    for label in labels(dataset / "annotations" / "validation"):
        gt, pred = read(label).astype(np.int64), read(predictions / label.name).astype(np.int64)
        keep = gt > 0
        np.add.at(matrix, (gt[keep] - 1, pred[keep] - 1), 1)
    inter = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - inter
    return {"mIoU": float(np.mean(inter[union > 0] / union[union > 0]) * 100),
            "aAcc": float(inter.sum() / matrix.sum() * 100)}


def depth(dataset: Path, predictions: Path, layout: str) -> dict[str, float]:
    scale, cap, (top, bottom, left, right) = DEPTH[layout]
    rows = []
    for label in labels(dataset / "depth"):
        gt, pred = read(label) / scale, read(predictions / label.name) / scale
        h, w = gt.shape
        crop = np.zeros(gt.shape, bool)
        crop[int(top * h):int(bottom * h), int(left * w):int(right * w)] = True
        valid = crop & (gt > 1e-3) & (gt < cap)
        g, p = gt[valid], np.clip(pred[valid], 1e-3, cap)
        ratio = np.maximum(g / p, p / g)
        rows.append({"AbsRel": np.mean(np.abs(g - p) / g), "SqRel": np.mean((g - p) ** 2 / g),
                     "RMSE": np.sqrt(np.mean((g - p) ** 2)), "RMSE_log": np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)),
                     "delta1": np.mean(ratio < 1.25), "delta2": np.mean(ratio < 1.25 ** 2),
                     "delta3": np.mean(ratio < 1.25 ** 3)})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=["ade20k", *DEPTH])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path, help="the eval output folder (eval.json and predictions/)")
    args = parser.parse_args()
    preds = args.out / "predictions"
    if not (args.out / "eval.json").is_file() or not preds.is_dir():
        raise UserError(f"{args.out} has no eval.json and predictions/: write them with "
                        f"`hgdeploy eval ... --save-predictions --out {args.out}`")
    mine = ade20k(args.dataset, preds) if args.layout == "ade20k" else depth(args.dataset, preds, args.layout)
    reported = json.loads((args.out / "eval.json").read_text())["metrics"]["engine"]
    worst = max(abs(mine[k] - reported[k]) for k in mine)
    for k, v in mine.items():
        print(f"{k:9s} this script {v:.9f}   eval.json {reported[k]:.9f}")
    print(f"largest difference: {worst:.2e}")
    return 0 if worst < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(exit_code(main, "score_predictions.py"))
