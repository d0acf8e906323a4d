"""Batches: graphs exported at model.batch = N, each image's output in a batch equal to its batch-1 output, and
`bench --batch` timing baseline and patched at several batch sizes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SMALL_EXPORT, TINY_TIMM, hgdeploy_main

from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.core.recipe import load_recipe
from hgdeploy.graph.lint import lint_path
from hgdeploy.measure.checks import cosine, per_image
from hgdeploy.measure.images import sample_photos, to_batch
from hgdeploy.measure.throughput import parse_batches

BATCH = 4
SMALL = [a for s in SMALL_EXPORT for a in ("--set", s)]


@pytest.fixture(scope="module")
def batch_export(small_export, tmp_path_factory):
    """The small export again at batch 4, for the same profile (trt-fp16: passes, plain fp16 twins, TensorRT lint)."""
    out = tmp_path_factory.mktemp("batch_export") / "out"
    done = hgdeploy_main("export", *SMALL, "--set", f"model.batch={BATCH}", "--engine", "trt-fp16", "--out", str(out),
                         "--json")
    assert done.returncode == 0, done.stderr
    return out


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT_NAME: x}), strict=True))


@pytest.mark.parametrize("graph, cosine_min", [("patched.opt.onnx", 0.99999), ("baseline.onnx", 0.99999),
                                               ("patched.fp16.onnx", 0.999)])
def test_each_image_of_a_batch_gets_its_batch_1_output(batch_export, small_export, graph, cosine_min):
    """Four different photos in one run of the batch-4 graph against each alone through the batch-1 graph."""
    x = to_batch(sample_photos()[:BATCH], Preprocess((112, 112))).numpy()
    batched = per_image([_run(batch_export / graph, x)], BATCH)
    alone = [_run(small_export / graph, x[i:i + 1]) for i in range(BATCH)]
    for i, (got, want) in enumerate(zip(batched, alone, strict=True)):
        for name in want:
            assert got[name].shape == want[name].shape
            assert cosine(got[name], want[name]) >= cosine_min, (graph, i, name)
            assert np.abs(got[name] - want[name]).max() <= 1e-3 * max(1.0, np.abs(want[name]).max()) * (
                50 if "fp16" in graph else 1), (graph, i, name)
    assert not np.allclose(batched[0]["tokens"], batched[1]["tokens"])  # four images, not one four times


def test_a_batched_export_is_static_at_its_batch_and_lints_clean(batch_export):
    for graph in ("baseline.onnx", "patched.opt.onnx", "baseline.fp16.onnx", "patched.fp16.onnx"):
        model = onnx.load(str(batch_export / graph), load_external_data=False)
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [BATCH, 3, 112, 112], graph
        assert all(o.type.tensor_type.shape.dim[0].dim_value == BATCH for o in model.graph.output), graph
    assert lint_path(batch_export / "patched.opt.onnx") == [] and lint_path(batch_export / "patched.fp16.onnx") == []


def test_check_runs_every_photo_once_at_any_batch(batch_export, two_photos):
    """Two photos through batch-4 graphs: one run (filled up with the same photos), two images in the fidelity."""
    done = hgdeploy_main("check", *SMALL, "--set", f"model.batch={BATCH}", "--engine", "ort-cpu-fp16", "--out",
                         str(batch_export), "--images", str(two_photos), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parity"]["passed"] and report["fidelity"]["images"] == 2
    assert [row["image"] for row in report["fidelity"]["per_image"]] == sorted(p.name for p in two_photos.iterdir())
    assert "Running 2 images in 1 batches of 4" in done.stderr


def test_a_batch_that_is_not_the_exports_is_refused(batch_export):
    done = hgdeploy_main("check", *SMALL, "--engine", "ort-cpu-fp16", "--out", str(batch_export))
    assert done.returncode == 2
    assert "exported with model.batch = 4, but this command asks for (not set)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", [0, 2000])
def test_model_batch_out_of_range_is_refused(value):
    with pytest.raises(UserError, match=f"model.batch = {value} .*1 to 1024"):
        load_recipe(None, [f"model.batch={value}"])


def test_per_image_splits_batches_and_drops_the_fill():
    outs = [{"y": np.arange(6).reshape(3, 2)}, {"y": np.arange(6, 12).reshape(3, 2)}]
    images = per_image(outs, 4)
    assert [img["y"].tolist() for img in images] == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]


def test_parse_batches():
    assert parse_batches("1,8,32") == [1, 8, 32]
    for bad in ("", "1,x", "0,4", "4,4"):
        with pytest.raises(ValueError, match="--batch"):
            parse_batches(bad)


def test_bench_times_each_batch_and_writes_rows_and_plot(tmp_path):
    done = hgdeploy_main("bench", *TINY_TIMM, "--batch", "1,3", "--torch", "--out", str(tmp_path / "bench"))
    assert done.returncode == 0, done.stderr
    assert "baseline img/s" in done.stdout and "largest speed-up:" in done.stdout
    rows = json.loads((tmp_path / "bench" / "batch.json").read_text())["batches"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        for key in ("baseline", "patched"):
            assert r["images_per_s"][key] == pytest.approx(r["batch"] * 1000 / r["latency_ms"][key])
        assert r["speedup"] == pytest.approx(r["latency_ms"]["baseline"] / r["latency_ms"]["patched"])
        assert r["speedup_torch"] == pytest.approx(r["latency_ms"]["torch_baseline"] / r["latency_ms"]["torch_patched"])
    assert (tmp_path / "bench" / "batch.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [(["--batch", "1,x"], "--batch '1,x': give batch sizes as integers"),
                                           (["--batch", "2", "--profile"], "--profile and --batch do not go together")])
def test_bench_batch_bad_input_is_one_line(tmp_path, args, message):
    done = hgdeploy_main("bench", *TINY_TIMM, *args, "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_eval_refuses_a_batched_recipe_before_any_work(tmp_path):
    done = hgdeploy_main("eval", *SMALL, "--set", "model.batch=2", "--dataset", str(tmp_path), "--out",
                         str(tmp_path / "eval"))
    assert done.returncode == 2 and "eval runs a dataset one image at a time" in done.stderr
    assert not (tmp_path / "eval").exists()


def test_a_dynamic_batch_export_runs_at_batch_1_and_3(dynamic_export):
    """model.batch = "dynamic": every graph's first axis is "batch"; the passes and the static check accept it,
    and the same graph gives each of 3 images its batch-1 output."""
    out = dynamic_export
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    for graph in ("baseline.onnx", "patched.opt.onnx", "patched.fused.onnx"):
        session = ort.InferenceSession(str(out / graph), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]
        assert all(o.shape[0] == "batch" for o in session.get_outputs())
        three = session.run(None, {INPUT_NAME: x})
        for i in range(3):
            alone = session.run(None, {INPUT_NAME: x[i:i + 1]})
            for got, want in zip(three, alone, strict=True):
                np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_the_static_rule_leaves_only_the_batch_axis_free():
    from onnx import TensorProto, helper

    from hgdeploy.core.contract import static_shape_problems

    def model(x_dims, y_dims):
        graph = helper.make_graph([helper.make_node("Relu", [INPUT_NAME], ["y"])], "g",
                                  [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, x_dims)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)])
        return helper.make_model(graph)

    assert static_shape_problems(model([2, 3], [2, 3])) == []
    assert static_shape_problems(model(["batch", 3], ["batch", 3])) == []
    assert static_shape_problems(model(["batch", "n"], ["batch", "n"])) == [
        f"tensor {INPUT_NAME} has an unknown dimension", "tensor y has an unknown dimension"]
    assert static_shape_problems(model(["batch", 3], ["b", 3])) == ["output y has no batch axis first"]
    assert static_shape_problems(model(["n", 3], ["n", 3])) != []  # a first axis of another name is not a batch


def test_model_batch_1_is_the_same_export_as_no_batch():
    from hgdeploy.graph.folder import recipe_difference

    assert recipe_difference({"model": {"batch": 1}}, {"model": {}}) is None
    assert recipe_difference({"model": {}}, {"model": {"batch": 2}}) == ("model.batch", None, 2)
