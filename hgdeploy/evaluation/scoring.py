"""Scoring one task over a dataset: the unpatched model, the patched model and the engine, side by side.

A `Scorer` turns each model's dense prediction (at the image's own size) into what is saved and
scored (labels; depth in the layout's encoding; an 8-bit saliency map), accumulates the task metrics
against the ground truth and the agreement between the models (the same metrics, one model's
predictions taken as the other's labels), and says how each prediction is stored. numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hgdeploy.core.errors import UserError
from hgdeploy.evaluation import datasets as ds
from hgdeploy.evaluation.datasets import Layout, Sample
from hgdeploy.evaluation.metrics import (
    DepthTotals,
    SaliencyTotals,
    SegmentationTotals,
    align_disparity,
)

MODELS = ("unpatched", "patched", "engine")
# agreement name -> (model, the model whose predictions serve as its labels)
AGREEMENTS = {"patched": ("patched", "unpatched"), "engine": ("engine", "unpatched"),
              "engine_vs_patched": ("engine", "patched")}


class Scorer:
    """Shared bookkeeping; subclasses say how a task reads, scores and stores its predictions.

    gate: the agreement metric (as a fraction, higher is better) an engine profile's
    parity.task_agreement_min applies to. worst: the per-image engine-vs-unpatched agreement metric
    the figure picks its worst and median image by, and whether lower is worse.
    """

    task = ""
    gate = ""
    worst: tuple[str, bool] = ("", True)

    def __init__(self, layout: Layout):
        self.layout = layout
        self.has_truth = layout.task is not None
        self.totals = {m: self._totals() for m in MODELS} if self.has_truth else {}
        self.agreement = {a: self._totals() for a in AGREEMENTS}

    def _totals(self) -> Any:
        raise NotImplementedError

    def target(self, sample: Sample, size: tuple[int, int]) -> Any:
        """The validated ground truth of one image (None for images-only layouts)."""
        raise NotImplementedError

    def scored(self, raw: np.ndarray, target: Any) -> np.ndarray:
        """A model's raw dense output -> the prediction as saved and scored."""
        raise NotImplementedError

    def _add(self, totals: Any, truth: Any, pred: np.ndarray) -> dict[str, Any] | None:
        raise NotImplementedError

    def _as_truth(self, pred: np.ndarray, target: Any) -> Any:
        """A model's prediction taken as ground truth for the agreement metrics (`target`: the image's own
        ground truth, None without one)."""
        raise NotImplementedError

    def add(self, target: Any, preds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accumulate one image; its row for the per-image table."""
        row: dict[str, Any] = {}
        if self.has_truth:
            row["metrics"] = {m: self._add(self.totals[m], target, preds[m]) for m in MODELS}
        row["agreement"] = {a: self._add(self.agreement[a], self._as_truth(preds[ref], target), preds[m])
                            for a, (m, ref) in AGREEMENTS.items()}
        return row

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.has_truth:
            out["metrics"] = {m: self._public(self.totals[m].scores()) for m in MODELS}
        out["agreement"] = {a: self._public(t.scores()) for a, t in self.agreement.items()}
        return out

    def _public(self, scores: dict[str, Any]) -> dict[str, Any]:
        return scores

    def gate_value(self, report: dict[str, Any]) -> float | None:
        value = report["agreement"]["engine_vs_patched"].get(self.gate)
        return None if value is None else float(value) / (100.0 if self.gate == "mIoU" else 1.0)

    def encode(self, pred: np.ndarray) -> tuple[np.ndarray, str]:
        """The prediction in the layout's stored encoding and the file suffix."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.layout.describe()


class SegmentationScorer(Scorer):
    task, gate, worst = "segmentation", "mIoU", ("aAcc", True)

    def __init__(self, layout: Layout, num_classes: int):
        self.num_classes = num_classes
        super().__init__(layout)

    def _totals(self) -> SegmentationTotals:
        return SegmentationTotals(self.num_classes)

    def target(self, sample: Sample, size: tuple[int, int]) -> Any:
        return ds.segmentation_target(self.layout, sample, size) if self.has_truth else None

    def scored(self, raw: np.ndarray, target: Any) -> np.ndarray:
        return raw.astype(np.int64)

    def _add(self, totals: SegmentationTotals, truth: Any, pred: np.ndarray) -> dict[str, Any]:
        labels, ignore = truth
        return totals.add(labels, pred, ignore)

    def _as_truth(self, pred: np.ndarray, target: Any) -> Any:
        return pred, None

    def _public(self, scores: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in scores.items() if k != "per_class"}

    def per_class(self) -> list[dict[str, Any]]:
        """IoU per class (percent) of each model against the ground truth; classes nobody saw left out."""
        if not self.has_truth:
            return []
        ious = {m: self.totals[m].scores()["per_class"]["IoU"] for m in MODELS}
        return [{"class": c} | {m: ious[m][c] for m in MODELS} for c in range(self.num_classes)
                if any(ious[m][c] is not None for m in MODELS)]

    def encode(self, pred: np.ndarray) -> tuple[np.ndarray, str]:
        return ds.encode_labels(self.layout, pred), ".png"

    def describe(self) -> str:
        return super().describe() + "; mIoU, mAcc, aAcc in percent (classes absent from prediction and truth left " \
                                    "out of the mean, as mmsegmentation does)"


class DepthScorer(Scorer):
    task, gate, worst = "depth", "delta1", ("delta1", True)

    def __init__(self, layout: Layout, output: str, fixed: tuple[float, float] | None = None):
        self.output, self.fixed = output, fixed
        super().__init__(layout)

    def _totals(self) -> DepthTotals:
        return DepthTotals()

    def target(self, sample: Sample, size: tuple[int, int]) -> Any:
        if not self.has_truth:
            return None
        depth = ds.depth_target(self.layout, sample, size)
        return depth, ds.depth_valid(self.layout, depth)

    def scored(self, raw: np.ndarray, target: Any) -> np.ndarray:
        """With ground truth: metres (disparity aligned by least squares first), clipped to the layout's range,
        as the layout stores them. Without: the model's raw output."""
        if target is None:
            return raw.astype(np.float32)
        depth, valid = target
        layout = self.layout
        if self.output == "metric":
            metres = raw
        elif self.fixed is not None:
            scale, shift = self.fixed
            metres = 1.0 / np.maximum(scale * raw.astype(np.float64) + shift, 1e-8)
        else:
            metres = align_disparity(raw, depth, valid, layout.max_depth)
        metres = np.clip(metres, layout.min_depth, layout.max_depth)
        return ds.decode_depth(layout, ds.encode_depth(layout, metres))

    def _add(self, totals: DepthTotals, truth: Any, pred: np.ndarray) -> dict[str, Any] | None:
        depth, valid = truth  # a raw output may be <= 0 somewhere: the errors need positive depths
        return totals.add(depth[valid], np.maximum(pred[valid], np.finfo(np.float32).tiny))

    def _as_truth(self, pred: np.ndarray, target: Any) -> Any:
        """Another model's depth as the labels: over the ground truth's valid pixels when there is ground
        truth, else over the pixels where the reference output is positive."""
        return pred, (target[1] if target is not None else pred > 0)

    def encode(self, pred: np.ndarray) -> tuple[np.ndarray, str]:
        if self.has_truth:
            return ds.encode_depth(self.layout, pred), ".png"
        return pred.astype(np.float32), ".npy"

    def describe(self) -> str:
        if not self.has_truth:
            return (f"{super().describe()}, in the model's output space ({self.output}), over pixels where the "
                    f"reference output is positive")
        if self.output == "metric":
            how = "metric depth output; "
        elif self.fixed is not None:
            how = f"depth = 1 / ({self.fixed[0]:g} x output + {self.fixed[1]:g}) (the recipe's fixed conversion); "
        else:
            how = ("the disparity output aligned to the ground truth's disparity (1/depth) by a least-squares scale "
                   "and shift per image, then inverted; ")
        return (how + super().describe() + "; errors per image, then the mean over images; predictions scored as "
                                           "stored (the layout's integer encoding)")


class SaliencyScorer(Scorer):
    task, gate, worst = "heatmap", "maxF", ("MAE", False)

    def _totals(self) -> SaliencyTotals:
        return SaliencyTotals()

    def target(self, sample: Sample, size: tuple[int, int]) -> Any:
        """(the salient mask, None): a ground truth has no soft map to take MAE against."""
        return (ds.saliency_target(sample, size), None) if self.has_truth else None

    def scored(self, raw: np.ndarray, target: Any) -> np.ndarray:
        return ds.encode_saliency(raw)

    def _add(self, totals: SaliencyTotals, truth: Any, pred: np.ndarray) -> dict[str, Any]:
        mask, reference = truth
        return totals.add(mask, pred, reference)

    def _as_truth(self, pred: np.ndarray, target: Any) -> Any:
        return pred > 127, pred

    def encode(self, pred: np.ndarray) -> tuple[np.ndarray, str]:
        return pred, ".png"

    def describe(self) -> str:
        return (super().describe() + "; MAE and max F-measure (beta^2 = 0.3, the best of 256 thresholds on the "
                                     "precision and recall averaged over images); agreement: MAE between the two maps, max F "
                                     "against the reference map thresholded at 0.5")


def make_scorer(kind: str, layout: Layout, num_classes: int = 0, depth_output: str = "metric",
                disparity: tuple[float, float] | None = None) -> Scorer:
    if kind == "segmentation":
        if layout.task is not None and num_classes != layout.num_classes:
            raise UserError(f"the model predicts {num_classes} classes but the {layout.name} layout has "
                               f"{layout.num_classes}; evaluate a model trained on {layout.name}")
        return SegmentationScorer(layout, num_classes)
    if kind == "depth":
        return DepthScorer(layout, depth_output, disparity)
    if kind == "heatmap":
        return SaliencyScorer(layout)
    raise ValueError(kind)
