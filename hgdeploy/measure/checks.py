"""Parity (engine vs PyTorch) and fidelity (patched vs unpatched PyTorch) on the same inputs.

Every runner is a Polygraphy runner fed the same inputs; they are streamed image by image here rather than
through Polygraphy's Comparator, which holds every output of every runner until the end. The metrics (cosine,
max abs error, heatmap IoU) are ours because Polygraphy has no cosine or IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import ExitStack
from typing import Iterable, Iterator

import numpy as np

from hgdeploy.core.files import JsonObject

HEATMAP_THRESHOLD = 0.5
# Below this share of salient pixels in the unpatched heatmap an IoU is a ratio of a handful of pixels
# (0.07 % salient gave IoU 0.005 on a real photo): it is reported as undefined, not as a failure.
HEATMAP_MIN_AREA = 0.01


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays (1.0 when both are zero)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / max(na * nb, 1e-300))


def token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tokens of the per-token cosine of [1, N, C] arrays: a blurred or swapped token shows."""
    a = a.astype(np.float64).reshape(-1, a.shape[-1])
    b = b.astype(np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(-1)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
    return float((num / den).mean())


def heatmap_iou(a: np.ndarray, b: np.ndarray, threshold: float = HEATMAP_THRESHOLD) -> float:
    """IoU of the two heatmaps thresholded at `threshold` (1.0 when both are empty)."""
    ma, mb = a > threshold, b > threshold
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def stream_all(runners: list, feeds: Iterable[dict[str, np.ndarray]],
               count: int) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    """Feed the same inputs to every runner, all active at once, and yield one image at a time (runner name ->
    its outputs, each array with a batch axis of 1), the first `count` images; NaN/Inf outputs are refused.

    Polygraphy's Comparator.run keeps every output of every runner until the end: three runners' outputs of
    all the photos of a big model (SwinV2-L's feature maps) held together. Here an image's outputs are dropped
    once its caller has read them, so parity and fidelity hold one image's outputs at a time.
    """
    with ExitStack() as stack:
        for runner in runners:
            stack.enter_context(runner)
        seen = 0
        for feed in feeds:
            outputs = {}
            for runner in runners:
                out = {name: np.array(array) for name, array in runner.infer(feed).items()}
                bad = [name for name, array in out.items() if not np.all(np.isfinite(array))]
                if bad:
                    raise ArithmeticError(f"{runner.name} produced NaN or Inf in {', '.join(bad)}")
                outputs[runner.name] = out
            images = {name: per_image([out], count - seen) for name, out in outputs.items()}
            for image in zip(*images.values()):
                yield dict(zip(images, image))
                seen += 1
            if seen == count:
                return


def per_image(outputs: list[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """Batched runs' outputs as one dict per image (each array keeps a batch axis of 1), the first `count`: the
    last batch is filled up with images already seen, which must not count twice."""
    images = [{name: array[i:i + 1] for name, array in out.items()}
              for out in outputs for i in range(len(next(iter(out.values()))))]
    return images[:count]


@dataclass(frozen=True)
class Parity:
    """The engine against PyTorch on the same inputs: the worst cosine and abs error, per output, and the verdict."""

    cosine_min: float
    max_abs: float
    passed: bool
    cosine_threshold: float
    max_abs_threshold: float
    per_output: dict[str, dict[str, float]]
    max_abs_rel: float = 0.0
    engine_model: str | None = None  # the graph the engine ran
    reference_device: str | None = None  # where PyTorch computed the fp32 reference ("cpu", "gpu")

    def failures(self) -> list[str]:
        """Why parity failed, one phrase per output and bound it missed ([] when it passed)."""
        out = []
        for name, v in self.per_output.items():
            if not v["cosine_min"] >= self.cosine_threshold:
                out.append(f"{name}: cosine {v['cosine_min']:.6f} < {self.cosine_threshold:g}")
            if not v["max_abs"] <= v["max_abs_threshold"]:
                out.append(f"{name}: max abs error {v['max_abs']:.3g} > {v['max_abs_threshold']:.3g}")
        return out

    def to_json(self) -> JsonObject:
        out: JsonObject = {"cosine_min": self.cosine_min, "max_abs": self.max_abs, "passed": self.passed,
                           "thresholds": {"cosine_min": self.cosine_threshold, "max_abs": self.max_abs_threshold,
                                          "max_abs_rel": self.max_abs_rel},
                           "per_output": {k: dict(v) for k, v in self.per_output.items()}}
        extra = {"engine_model": self.engine_model, "reference_device": self.reference_device}
        return out | {k: v for k, v in extra.items() if v is not None}


ParityTerms = dict[str, tuple[float, float, float]]


def parity_terms(engine: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> ParityTerms:
    """One image's cosine, largest abs error and scale (largest |reference|) per output: what parity keeps of it."""
    return {name: (cosine(engine[name], ref), float(np.max(np.abs(engine[name].astype(np.float64) - ref))),
                   float(np.max(np.abs(ref)))) for name, ref in reference.items()}


def parity_of(terms: list[ParityTerms], cosine_min: float, max_abs: float,
              per_output_max_abs: dict[str, float] | None = None, max_abs_rel: float = 0.0) -> Parity:
    """Worst cosine and largest abs error over all outputs and images, passed against the thresholds.

    An output's abs-error bound is its own entry in per_output_max_abs (else max_abs) plus max_abs_rel times
    its scale, the largest |reference| over the images: an fp16 engine's error grows with the output's
    magnitude (DINOv2 tokens of |x| ~ 10, a heatmap in [0, 1], Segmenter's logits), and one profile must fit
    every model, whose outputs it cannot name.
    """
    bounds = per_output_max_abs or {}
    per_output: dict[str, dict[str, float]] = {}
    passed = True
    for name in terms[0]:
        cos = min(t[name][0] for t in terms)
        err = max(t[name][1] for t in terms)
        scale = max(t[name][2] for t in terms)
        bound = bounds.get(name, max_abs) + max_abs_rel * scale
        per_output[name] = {"cosine_min": cos, "max_abs": err, "scale": scale, "max_abs_threshold": bound}
        passed = passed and cos >= cosine_min and err <= bound
    cmin = min(v["cosine_min"] for v in per_output.values())
    amax = max(v["max_abs"] for v in per_output.values())
    return Parity(cmin, amax, passed, cosine_min, max_abs, per_output, max_abs_rel)


def parity(engine: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
           cosine_min: float, max_abs: float, per_output_max_abs: dict[str, float] | None = None,
           max_abs_rel: float = 0.0) -> Parity:
    """parity_of over lists of outputs held together (tests, small runs)."""
    return parity_of([parity_terms(e, r) for e, r in zip(engine, reference)], cosine_min, max_abs,
                     per_output_max_abs, max_abs_rel)


def _f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def tokens_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"cosine": token_cosine(p, b)}


def heatmap_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """IoU (None where the unpatched heatmap has under HEATMAP_MIN_AREA salient pixels) and mean abs error."""
    salient = float(np.mean(b > HEATMAP_THRESHOLD))
    iou = heatmap_iou(p, b) if salient >= HEATMAP_MIN_AREA else None
    return {"heatmap_iou": iou, "heatmap_mae": float(np.mean(np.abs(_f64(p) - b)))}


def segmentation_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-pixel logit cosine and the share of pixels whose predicted class is unchanged."""
    pixels_p, pixels_b = (x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1) for x in (p, b))
    return {"cosine": token_cosine(pixels_p, pixels_b),
            "label_agreement": float(np.mean(p.argmax(1) == b.argmax(1)))}


def depth_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine of the depth maps and mean |patched - original| / mean |original|.

    Relative to the map's mean rather than per pixel: relative-depth models (MiDaS, Depth Anything)
    output inverse depth with near-zero pixels, where a per-pixel AbsRel explodes.
    """
    scale = max(float(np.mean(np.abs(_f64(b)))), 1e-30)
    return {"cosine": cosine(p, b), "depth_rel_error": float(np.mean(np.abs(_f64(p) - b)) / scale)}


def features_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-position cosine of the channel vectors of [B, C, H, W] maps."""
    vectors_p, vectors_b = (x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1) for x in (p, b))
    return {"cosine": token_cosine(vectors_p, vectors_b)}


def classification_metrics(p: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"cosine": token_cosine(p, b), "top1_agreement": float(np.mean(p.argmax(-1) == b.argmax(-1)))}


# kind -> per-image metrics of (patched, baseline); every metric is "higher is better" except *_mae, *_error.
METRICS = {"tokens": tokens_metrics, "heatmap": heatmap_metrics, "segmentation": segmentation_metrics,
           "depth": depth_metrics, "classification": classification_metrics, "features": features_metrics}
LOWER_IS_BETTER = ("_mae", "_error")


FidelityRow = dict[str, str | float | None]


def fidelity_row(name: str, patched: dict[str, np.ndarray], baseline: dict[str, np.ndarray],
                 kinds: dict[str, str]) -> FidelityRow:
    """One image's metrics, patched vs unpatched, by each output's kind (the first output of a kind names it)."""
    row: FidelityRow = {"image": name}
    for out, kind in kinds.items():
        for metric, value in METRICS[kind](patched[out], baseline[out]).items():
            row.setdefault(metric, value)
    return row


def fidelity_of(per_image: list[FidelityRow]) -> JsonObject:
    """The summary of the per-image rows: the mean of every metric ("cosine" -> cosine_mean, others by their own
    name, as the reports have always used) and the worst image ("_min", or "_max" where lower is better), over
    the images where the metric is defined; "<metric>_undefined" counts the others."""
    summary: JsonObject = {"images": len(per_image)}
    metrics = [k for k in (per_image[0] if per_image else {}) if k != "image"]
    for metric in metrics:
        values = [r[metric] for r in per_image if r[metric] is not None]
        mean_key = "cosine_mean" if metric == "cosine" else metric
        lower = metric.endswith(LOWER_IS_BETTER)
        summary[mean_key] = float(np.mean(values)) if values else None
        if not metric.endswith("_mae"):
            worst = (np.max(values) if lower else np.min(values)) if values else None
            summary[f"{metric}_{'max' if lower else 'min'}"] = None if worst is None else float(worst)
        if len(values) < len(per_image):
            summary[f"{metric}_undefined"] = len(per_image) - len(values)
    summary["per_image"] = per_image
    return summary


def fidelity(patched: list[dict[str, np.ndarray]], baseline: list[dict[str, np.ndarray]],
             kinds: dict[str, str], names: list[str]) -> JsonObject:
    """fidelity_of over lists of outputs held together (tune's scoring, tests)."""
    return fidelity_of([fidelity_row(n, p, b, kinds) for n, p, b in zip(names, patched, baseline)])
