"""Task metrics against ground truth, accumulated one image at a time (bounded memory on any dataset).

The formulas are the field's usual ones, written out here so the report can say exactly what it
computed: mmsegmentation's confusion-matrix metrics, the Eigen et al. depth errors as monodepth/BTS/DPT
compute them (per image, then the mean over images), and the salient-object MAE and max F-measure
(β² = 0.3) of the SOD benchmarks. numpy only: the deploy side can score saved predictions without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BETA2 = 0.3  # F-measure weight of precision, as every salient-object benchmark uses


# --------------------------------------------------------------------------------------------- segmentation


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: np.ndarray | None = None) -> np.ndarray:
    """[K, K] int64 counts, rows = ground-truth class, columns = predicted class; `ignore` pixels left out."""
    keep = np.ones(gt.shape, bool) if ignore is None else ~ignore
    idx = gt[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(matrix: np.ndarray) -> dict[str, Any]:
    """mIoU, mAcc and aAcc in percent (mmseg's convention), and per-class IoU/Acc (None where undefined).

    A class absent from both ground truth and prediction has no IoU and is left out of the mean; a class
    absent from the ground truth has no accuracy. With no labelled pixel at all every metric is None.
    """
    m = matrix.astype(np.float64)
    inter, gt_area, pred_area = np.diag(m), m.sum(1), m.sum(0)
    union = gt_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt_area > 0, inter / gt_area, np.nan)
    total = gt_area.sum()

    def pct(values: np.ndarray) -> float | None:
        return None if np.all(np.isnan(values)) else float(np.nanmean(values) * 100)

    return {"mIoU": pct(iou), "mAcc": pct(acc), "aAcc": float(inter.sum() / total * 100) if total else None,
            "per_class": {"IoU": [None if np.isnan(v) else float(v * 100) for v in iou],
                          "Acc": [None if np.isnan(v) else float(v * 100) for v in acc]}}


@dataclass
class SegmentationTotals:
    """Confusion matrix summed over a dataset."""

    num_classes: int
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, Any]:
        """Accumulate one image; returns that image's own scores (without the per-class lists)."""
        one = confusion(gt, pred, self.num_classes, ignore)
        self.matrix += one
        return {k: v for k, v in segmentation_scores(one).items() if k != "per_class"}

    def scores(self) -> dict[str, Any]:
        return segmentation_scores(self.matrix)


# -------------------------------------------------------------------------------------------------- depth

DEPTH_METRICS = ("AbsRel", "SqRel", "RMSE", "RMSE_log", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = {"AbsRel", "SqRel", "RMSE", "RMSE_log", "MAE"}


def depth_errors(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The standard depth errors of one image over its valid pixels (1-D arrays of positive depths)."""
    gt, pred = gt.astype(np.float64), pred.astype(np.float64)
    ratio = np.maximum(gt / pred, pred / gt)
    diff = gt - pred
    return {"AbsRel": float(np.mean(np.abs(diff) / gt)), "SqRel": float(np.mean(diff ** 2 / gt)),
            "RMSE": float(np.sqrt(np.mean(diff ** 2))),
            "RMSE_log": float(np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2))),
            "delta1": float(np.mean(ratio < 1.25)), "delta2": float(np.mean(ratio < 1.25 ** 2)),
            "delta3": float(np.mean(ratio < 1.25 ** 3))}


def align_disparity(pred: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray, max_depth: float) -> np.ndarray:
    """A relative-depth model's disparity, scaled and shifted by least squares onto the ground truth's
    disparity (1 / depth) over the valid pixels (MiDaS / Depth Anything evaluation), returned as depth.
    The aligned disparity is floored at 1 / max_depth, so no pixel becomes infinitely far."""
    x = pred[valid].astype(np.float64)
    y = 1.0 / gt_depth[valid].astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
    disparity = np.maximum(scale * pred.astype(np.float64) + shift, 1.0 / max_depth)
    return (1.0 / disparity).astype(np.float32)


@dataclass
class DepthTotals:
    """Per-image depth errors summed over a dataset (the reported value is their mean over images)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DEPTH_METRICS, 0.0))
    images: int = 0

    def add(self, gt: np.ndarray, pred: np.ndarray) -> dict[str, float] | None:
        """gt, pred: 1-D valid pixels. An image without a valid pixel counts for nothing (None)."""
        if gt.size == 0:
            return None
        one = depth_errors(gt, pred)
        for k, v in one.items():
            self.sums[k] += v
        self.images += 1
        return one

    def scores(self) -> dict[str, float | None]:
        return {k: (v / self.images if self.images else None) for k, v in self.sums.items()}


# ----------------------------------------------------------------------------------------------- saliency

LEVELS = 256  # saliency maps are 8-bit: thresholds 0..255


def saliency_curves(pred_u8: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of `pred_u8 >= t` for t = 0..255 against a boolean mask (0 where undefined)."""
    fg = np.bincount(pred_u8[mask].ravel(), minlength=LEVELS)[::-1].cumsum()[::-1].astype(np.float64)
    bg = np.bincount(pred_u8[~mask].ravel(), minlength=LEVELS)[::-1].cumsum()[::-1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(fg + bg > 0, fg / (fg + bg), 0.0)
        recall = np.where(mask.sum() > 0, fg / max(int(mask.sum()), 1), 0.0)
    return precision, recall


def f_measure(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
    return np.nan_to_num(f)


@dataclass
class SaliencyTotals:
    """MAE summed over images; precision and recall curves summed over images. max F is the best F over
    the 256 thresholds of the mean curves (the SOD benchmarks' "maxF")."""

    mae: float = 0.0
    precision: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS))
    recall: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS))
    images: int = 0

    def add(self, mask: np.ndarray, pred_u8: np.ndarray, reference_u8: np.ndarray | None = None) -> dict[str, float]:
        """mask: boolean ground truth; pred_u8: the 8-bit saliency map as saved. reference_u8: another model's
        map, when that model is the reference: MAE is then taken against the map itself, the F-measure
        against the mask (the map above 127)."""
        against = mask if reference_u8 is None else reference_u8.astype(np.float64) / 255.0
        mae = float(np.mean(np.abs(pred_u8.astype(np.float64) / 255.0 - against)))
        p, r = saliency_curves(pred_u8, mask)
        self.mae, self.precision, self.recall, self.images = self.mae + mae, self.precision + p, self.recall + r, \
            self.images + 1
        return {"MAE": mae, "maxF": float(f_measure(p, r).max())}

    def scores(self) -> dict[str, float | None]:
        if not self.images:
            return {"MAE": None, "maxF": None}
        f = f_measure(self.precision / self.images, self.recall / self.images)
        return {"MAE": self.mae / self.images, "maxF": float(f.max())}
