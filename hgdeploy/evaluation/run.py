"""`hgdeploy eval`: task metrics on a dataset for the unpatched model, the patched model and the engine.

Streams: one image at a time goes through the three models at the family's test-time inference
(resize, or Segmenter's sliding window), is scored and, with --save-predictions, written; nothing
but the metric totals and one small row per image stays in memory. All ground truth is checked
before any model is loaded, so a bad label file fails at once, with nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image

from hgdeploy.backends import EngineProfile, make_runner
from hgdeploy.core import progress
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import staged_output, write_atomic_bytes
from hgdeploy.core.memory import peak_rss_mb, rss_mb
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.core.recipe import Recipe
from hgdeploy.evaluation import datasets as ds
from hgdeploy.evaluation import report as eval_report
from hgdeploy.evaluation.scoring import MODELS, Scorer, make_scorer
from hgdeploy.families.catalogue import get_family
from hgdeploy.families.registry import Family
from hgdeploy.graph.folder import ExportFolder
from hgdeploy.measure.images import Photo, open_rgb, to_tensor
from hgdeploy.pipeline.context import STRUCTURE_ONLY, Context, load_context
from hgdeploy.pipeline.road import write_deployable
from hgdeploy.pipeline.steps import backend_info, torch_runners

DENSE_KINDS = ("segmentation", "depth", "heatmap")
EVAL_FOLDER = "eval"


@dataclasses.dataclass(frozen=True)
class Inference:
    """How one image is run at test time: the family's mode, the window stride (slide), the output read."""

    mode: str
    output: str
    kind: str
    pre: Preprocess
    stride: tuple[int, int]

    def describe(self) -> str:
        h, w = self.pre.size
        if self.mode == "slide":
            return (f"sliding window: the short side resized to {min(h, w)} ({self.pre.resize}), {h}x{w} windows "
                    f"with stride {self.stride[0]}x{self.stride[1]}, logits averaged where windows overlap, then "
                    f"resized to the image's size (bilinear) and argmax")
        return f"resized to {h}x{w} ({self.pre.resize}); the output resized back to the image's size (bilinear)"


def anchors(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side, the last flush with the edge (Segmenter's sliding_window)."""
    return [a for a in range(0, length, stride) if a < length - window] + [length - window]


def _infer(runner: Any, x: torch.Tensor, output: str) -> torch.Tensor:
    out = runner.infer({INPUT_NAME: x[None].numpy()})[output]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def predict(runner: Any, image: Image.Image, how: Inference) -> np.ndarray:
    """One model's dense prediction at the image's own size: class labels, depth, or a heatmap."""
    size = (image.height, image.width)
    if how.mode == "slide":
        (wh, ww), (sh, sw) = how.pre.size, how.stride
        scale = max(wh / size[0], ww / size[1])
        nh, nw = max(wh, round(size[0] * scale)), max(ww, round(size[1] * scale))
        x = to_tensor(Photo("", image), dataclasses.replace(how.pre, size=(nh, nw)))
        total, count = None, torch.zeros(1, nh, nw)
        for top in anchors(nh, wh, sh):
            for left in anchors(nw, ww, sw):
                logits = _infer(runner, x[:, top:top + wh, left:left + ww], how.output)[0]
                total = torch.zeros(logits.shape[0], nh, nw) if total is None else total
                total[:, top:top + wh, left:left + ww] += logits
                count[:, top:top + wh, left:left + ww] += 1
        out = (total / count)[None]
    else:
        out = _infer(runner, to_tensor(Photo("", image), how.pre), how.output)
        out = out.reshape(1, -1, *out.shape[-2:])
    out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return (out.argmax(1)[0] if how.kind == "segmentation" else out[0, 0]).numpy()


def dense_output(family: Family, layout: ds.Layout) -> tuple[str, str]:
    """(output name, kind) the layout scores; UserError when the family has no such output."""
    outputs = family.outputs
    wanted = [layout.task] if layout.task else list(DENSE_KINDS)
    for kind in wanted:
        for name, k in outputs:
            if k == kind:
                return name, kind
    have = ", ".join(f"{n} ({k})" for n, k in outputs)
    if layout.task:
        raise UserError(f"the {layout.name} layout scores {layout.task} but family {family.name} outputs "
                        f"{have}; choose a layout of that task (or --layout folder for agreement only)")
    raise UserError(f"family {family.name} has no dense output to evaluate ({have})")


def output_classes(graph: Path, output: str) -> int:
    """Channels of a segmentation output, read from the exported graph's static output shape."""
    model = onnx.load(str(graph), load_external_data=False)
    for out in model.graph.output:
        if out.name == output:
            return int(out.type.tensor_type.shape.dim[1].dim_value)
    raise UserError(f"{graph} has no output {output!r}; export again")


def check_truth(layout: ds.Layout, samples: list[ds.Sample]) -> None:
    """Read every ground-truth file once (values, sizes) before any model runs."""
    if layout.task is None:
        return
    read = {"segmentation": lambda s, hw: ds.segmentation_target(layout, s, hw),
            "depth": lambda s, hw: ds.depth_target(layout, s, hw), "heatmap": ds.saliency_target}[layout.task]
    with progress.step(f"Checking {len(samples)} ground-truth files ({layout.name})", total=len(samples)) as advance:
        for sample in samples:
            try:
                with Image.open(sample.image) as img:
                    width, height = img.size
            except OSError as exc:
                raise UserError(f"{sample.image} cannot be read as an image ({exc.__class__.__name__}); remove or "
                                f"replace it") from exc
            read(sample, (height, width))
            advance()


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A dataset checked for a recipe before any model is loaded: its samples and the output it scores."""

    path: str
    layout: ds.Layout
    samples: list[ds.Sample]
    output: str
    kind: str


def read_dataset(path: str, layout_name: str | None, limit: int | None, recipe: Recipe) -> EvalData:
    """The dataset's layout (given or told by its folders) and samples (the first `limit`), the recipe family's
    output it scores and, for segmentation, that the model predicts the layout's classes (from the recipe and the
    checkpoint's description), the sliding window's stride, and every ground-truth file read once: all before a
    model is loaded or anything is written."""
    layout, samples = ds.open_dataset(path, layout_name)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit}: give a positive number of images")
        samples = samples[:limit]
    family = get_family(recipe.family)
    output, kind = dense_output(family, layout)
    if kind == "segmentation" and family.classes is not None:
        check_classes(family.classes(recipe.checkpoint, recipe.options), layout)
    if family.inference == "slide":
        check_stride(recipe.data.get("eval", {}), recipe.input_size)
    check_truth(layout, samples)
    return EvalData(str(path), layout, samples, output, kind)


def check_classes(classes: int | None, layout: ds.Layout) -> None:
    """A segmentation model scored against a layout's ground truth must predict that layout's classes."""
    if classes is not None and layout.task is not None and classes != layout.num_classes:
        raise UserError(f"the model predicts {classes} classes but the {layout.name} layout has "
                        f"{layout.num_classes}; evaluate a model trained on {layout.name} (README, \"Evaluate on a "
                        f"dataset\": the bundled recipe for each sample dataset), or its images alone with "
                        f"--dataset IMAGE_FOLDER --layout folder (agreement only)")


def model_classes(ctx: Context, output: str) -> int:
    """Channels of a loaded model's segmentation output, from one forward on the meta device (no compute): for a
    family that cannot tell its classes before loading."""
    from hgdeploy.measure.flops import meta_copy

    model = meta_copy(ctx.models.baseline)
    with torch.no_grad():
        outs = model(ctx.example[:1].to("meta"))
    return int(dict(zip(ctx.models.family.output_names, outs))[output].shape[1])


def check_stride(settings: dict[str, Any], size: tuple[int, int]) -> None:
    """[eval] window_stride: at most the window (the input size), else windows would leave pixels unseen."""
    stride = settings.get("window_stride", size[0]), settings.get("window_stride", size[1])
    if stride[0] > size[0] or stride[1] > size[1]:
        raise UserError(f"eval.window_stride = {stride[0]} is larger than the {size[0]}x{size[1]} window: "
                        f"windows would leave pixels unseen; give a stride of at most {min(size)}")


@contextlib.contextmanager
def graphs_to_score(ctx: Context) -> Iterator[ExportFolder]:
    """The context's export folder, or a fresh one from the export road in a temporary folder."""
    if ctx.export is not None:
        yield ctx.export
        return
    with tempfile.TemporaryDirectory(prefix="hgdeploy-eval-") as tmp:
        folder, _ = write_deployable(ctx.models, ctx.example, ctx.engine, Path(tmp), ctx.describe().to_json())
        yield folder


def pick_figure_images(rows: list[dict[str, Any]], scorer: Scorer) -> list[tuple[str, int]]:
    """(label, index) of the worst and the median image by the engine's agreement with the unpatched model."""
    key, lower_is_worse = scorer.worst
    scored = [(r["agreement"]["engine"][key], i) for i, r in enumerate(rows)
              if r["agreement"]["engine"] and r["agreement"]["engine"].get(key) is not None]
    if not scored:
        return []
    scored.sort(reverse=not lower_is_worse)
    picks = [("worst", scored[0][1]), ("median", scored[len(scored) // 2][1])]
    return picks if picks[0][1] != picks[1][1] else picks[:1]


def inference(ctx: Context, data: EvalData) -> Inference:
    """How each image runs: the family's mode, and for a sliding window the recipe's stride (checked)."""
    settings, pre = ctx.recipe.data.get("eval", {}), ctx.models.preprocess
    how = Inference(ctx.models.family.inference, data.output, data.kind, pre,
                    (settings.get("window_stride", pre.size[0]), settings.get("window_stride", pre.size[1])))
    if how.mode == "slide":
        check_stride(settings, pre.size)
    return how


def scorer_for(ctx: Context, data: EvalData, graph: Path) -> Scorer:
    """The task's scorer: classes read from the engine graph, the depth output and fixed disparity from [eval]."""
    settings = ctx.recipe.data.get("eval", {})
    fixed = (settings["disparity_scale"], settings["disparity_shift"]) if "disparity_scale" in settings else None
    return make_scorer(data.kind, data.layout, output_classes(graph, data.output) if data.kind == "segmentation" else 0,
                       settings.get("depth_output", ctx.models.family.depth_output), fixed)


def evaluate(recipe: Recipe, engine: EngineProfile, data: EvalData, export: ExportFolder | None, out: Path,
             save_predictions: bool) -> dict[str, Any]:
    """`hgdeploy eval`: every sample through the unpatched and patched PyTorch models and the engine, scored;
    eval.json, eval.md, eval.png (and predictions/) staged into `out`, which appears whole."""
    ctx = load_context(recipe, engine, export=export)
    if data.kind == "segmentation" and ctx.models.family.classes is None:  # not told before loading: now, first
        check_classes(model_classes(ctx, data.output), data.layout)
    how = inference(ctx, data)
    report: dict[str, Any] = ctx.describe().to_json() | {"backend": backend_info(ctx)}
    with graphs_to_score(ctx) as folder:
        graph = folder.patched_graph(engine)
        scorer = scorer_for(ctx, data, graph)
        with staged_output(out) as stage:
            _evaluate(ctx, data, how, scorer, graph, report, stage, save_predictions)
    return report


def _evaluate(ctx: Context, data: EvalData, how: Inference, scorer: Scorer, graph: Path, report: dict[str, Any],
              stage: Path, save_predictions: bool) -> None:
    """The three models over the dataset, scored; the report and its files written into `stage`."""
    engine = ctx.engine
    torch_side = torch_runners(ctx, reference_on_device=True)
    report["torch_device"] = "gpu" if torch_side["torch_patched"].on_cuda else "cpu"
    runners = {"unpatched": torch_side["torch_baseline"], "patched": torch_side["torch_patched"],
               "engine": make_runner(graph, engine)}
    with contextlib.ExitStack() as stack:
        for r in runners.values():
            stack.enter_context(r)
        rows, memory = run_dataset(data.samples, runners, how, scorer, stage if save_predictions else None,
                                   f"{data.layout.name}, {engine.name} engine")
        panels = [figure_row(label, data.samples[i], rows[i], runners, how, scorer)
                  for label, i in pick_figure_images(rows, scorer)]
    report |= scores(data, how, scorer, graph, rows) | {"gate": gate(scorer, report | scorer.metrics(), engine),
                                                        "memory": memory}
    if not ctx.pretrained:
        report["structure_check_only"] = STRUCTURE_ONLY
    report["per_image"] = [{"image": s.stem} | r for s, r in zip(data.samples, rows)]
    eval_report.write(stage, report, panels, data.kind)


def scores(data: EvalData, how: Inference, scorer: Scorer, graph: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's dataset description, the metrics and, for segmentation, the per-class table."""
    out = {"dataset": {"path": data.path, "layout": data.layout.name, "images": len(data.samples),
                       "scoring": scorer.describe(), "inference": how.describe(),
                       "depth_output": scorer.output if data.kind == "depth" else None},
           "engine_model": graph.name} | scorer.metrics()
    if data.kind == "segmentation":
        out["per_class"] = scorer.per_class()
    return out


def gate(scorer: Scorer, report: dict[str, Any], engine: EngineProfile) -> dict[str, Any]:
    """The profile's task gate: the engine's agreement with patched PyTorch in the task's headline metric."""
    threshold = engine.task_agreement_min
    value = scorer.gate_value(report)
    passed = True if threshold is None or value is None else value >= threshold
    return {"metric": f"agreement.engine_vs_patched.{scorer.gate}" + (" / 100" if scorer.gate == "mIoU" else ""),
            "value": value, "task_agreement_min": threshold, "passed": passed}


def figure_row(label: str, sample: ds.Sample, row: dict[str, Any], runners: dict[str, Any], how: Inference,
               scorer: Scorer) -> eval_report.FigureRow:
    """One row of eval.png: the sample run again through the three models, with the per-image agreement it was
    picked by (scorer.worst) for the patched model and the engine against the unpatched one."""
    metric = scorer.worst[0]
    agreement = {a: (row["agreement"][a] or {}).get(metric) for a in ("patched", "engine")}
    return eval_report.FigureRow(label, sample, *one_image(sample, runners, how, scorer), metric, agreement)


def one_image(sample: ds.Sample, runners: dict[str, Any], how: Inference, scorer: Scorer) -> tuple[Any, Any, dict]:
    """(image, ground truth, {model: prediction as scored}) of one sample."""
    image = open_rgb(sample.image)
    target = scorer.target(sample, (image.height, image.width))
    return image, target, {m: scorer.scored(predict(runners[m], image, how), target) for m in MODELS}


def run_dataset(samples: list[ds.Sample], runners: dict[str, Any], how: Inference, scorer: Scorer,
                stage: Path | None, what: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every sample through the three models, scored, one at a time; per-image rows and the memory trace."""
    rows: list[dict[str, Any]] = []
    memory: dict[str, float] = {}
    with progress.step(f"Evaluating {len(samples)} images ({what})", total=len(samples)) as advance:
        for i, sample in enumerate(samples):
            _, target, preds = one_image(sample, runners, how, scorer)
            rows.append(scorer.add(target, preds))
            if stage is not None:
                save_prediction(stage, sample, scorer, preds["engine"])
            if i == 0:
                memory["rss_mb_after_first_image"] = rss_mb()
            advance()
    memory |= {"rss_mb_after_last_image": rss_mb(), "peak_rss_mb": peak_rss_mb()}
    return rows, memory


def save_prediction(stage: Path, sample: ds.Sample, scorer: Scorer, pred: np.ndarray) -> None:
    """The engine's prediction in the layout's own encoding (PNG), or float32 .npy for images-only depth."""
    data, suffix = scorer.encode(pred)
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, data)
    else:
        Image.fromarray(data).save(buffer, format="PNG")
    write_atomic_bytes(stage / "predictions" / f"{sample.stem}{suffix}", buffer.getvalue())
