"""Metrics and FLOP counting on inputs whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hgdeploy.layers import TokenClustering
from hgdeploy.measure.checks import (
    Parity,
    classification_metrics,
    cosine,
    depth_metrics,
    fidelity,
    heatmap_iou,
    heatmap_metrics,
    parity,
    per_image,
    segmentation_metrics,
    stream_all,
    token_cosine,
)
from hgdeploy.measure.flops import count_gflops


def test_cosine_and_token_cosine():
    a = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    swapped = a[:, ::-1]
    assert token_cosine(a, swapped) == pytest.approx(0.0)  # per token: orthogonal
    assert cosine(a, swapped) == pytest.approx(0.0)
    zero = np.zeros_like(a)
    assert cosine(zero, zero) == 1.0  # both zero: the same output, as the docstring says
    assert cosine(zero, a) == 0.0 and cosine(a, zero) == 0.0  # one zero: no direction in common


def test_heatmap_iou():
    a = np.zeros((1, 1, 4, 4))
    b = np.zeros((1, 1, 4, 4))
    a[..., :2, :] = 0.9  # 8 pixels
    b[..., :1, :] = 0.9  # 4 pixels, all inside a
    assert heatmap_iou(a, b) == pytest.approx(0.5)
    assert heatmap_iou(np.zeros(4), np.zeros(4)) == 1.0
    # "thresholded at": a pixel at exactly the threshold is not salient, in either map
    assert heatmap_iou(np.array([0.5, 0.9]), np.array([0.9, 0.5])) == 0.0


def test_a_heatmap_at_exactly_the_threshold_has_no_salient_pixel_and_no_iou():
    """heatmap_metrics counts salient pixels as heatmap_iou does (above the threshold): a map sitting at 0.5
    has none, so its IoU is undefined rather than the 1.0 of two empty masks."""
    flat = np.full((1, 1, 10, 10), 0.5)
    assert heatmap_metrics(flat, flat) == {"heatmap_iou": None, "heatmap_mae": 0.0}
    one = flat.copy()
    one[..., 0, 0] = 0.9  # 1 % salient: the IoU is defined
    assert heatmap_metrics(one, one)["heatmap_iou"] == 1.0


def test_label_agreement_and_depth_error_by_hand():
    b = np.zeros((1, 3, 2, 2))
    b[0, 0] = 1.0  # every pixel: class 0
    p = b.copy()
    p[0, 2, 1, 1] = 2.0  # one pixel of four now says class 2
    assert segmentation_metrics(p, b)["label_agreement"] == 0.75
    depth = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert depth_metrics(depth, depth) == {"cosine": 1.0, "depth_rel_error": 0.0}
    off = depth + np.array([[0.5, -0.5], [0.0, 0.0]])  # mean |error| 0.25, mean |depth| 2.5
    assert depth_metrics(off, depth)["depth_rel_error"] == pytest.approx(0.1)


def test_parity_passes_and_fails_on_thresholds():
    ref = [{"y": np.ones((1, 8), np.float32)}]
    close = [{"y": np.ones((1, 8), np.float32) + 1e-6}]
    far = [{"y": np.linspace(0, 2, 8, dtype=np.float32)[None]}]
    assert parity(close, ref, 0.9999, 1e-3).passed
    bad = parity(far, ref, 0.9999, 1e-3)
    assert not bad.passed and bad.max_abs == pytest.approx(1.0)


def test_parity_bound_grows_with_each_outputs_own_scale():
    small = np.full((1, 8), 0.5)
    large = np.linspace(-40, 40, 8)[None]
    ref = [{"small": small, "large": large}]
    engine = [{"small": small + 0.01, "large": large + 0.1}]
    assert not parity(engine, ref, 0.99, 0.05).passed  # 0.1 over the absolute bound
    scaled = parity(engine, ref, 0.99, 0.05, max_abs_rel=0.002)
    assert scaled.passed
    assert scaled.per_output["large"]["scale"] == pytest.approx(40)
    assert scaled.per_output["large"]["max_abs_threshold"] == pytest.approx(0.05 + 0.002 * 40)
    assert scaled.to_json()["thresholds"]["max_abs_rel"] == 0.002
    off = [{"small": small + 0.06, "large": large}]  # the small output does not borrow the large one's scale
    assert not parity(off, ref, 0.99, 0.05, max_abs_rel=0.002).passed


def test_fidelity_summary():
    base = [{"t": np.ones((1, 2, 3)), "h": np.full((1, 1, 2, 2), 0.9)}]
    patched = [{"t": np.ones((1, 2, 3)), "h": np.full((1, 1, 2, 2), 0.1)}]
    fid = fidelity(patched, base, {"t": "tokens", "h": "heatmap"}, ["img"])
    assert fid["cosine_mean"] == pytest.approx(1.0)
    assert fid["heatmap_iou"] == 0.0 and fid["heatmap_mae"] == pytest.approx(0.8)


def test_fidelity_takes_the_worst_image_in_each_metrics_direction_and_counts_the_undefined():
    """Three images of a depth map and a heatmap. Depth: patched = baseline, 2 x baseline, baseline + 1 on one
    pixel (cosine 1, 1, 5 / (2 sqrt 7); relative error 0, 1, 1/4). The third image's heatmap is flat at 0.1: no
    salient pixel, its IoU undefined."""
    ones, hot = np.ones((1, 2, 2)), np.full((1, 1, 10, 10), 0.9)
    bump = ones.copy()
    bump[0, 0, 0] = 2.0
    base = [{"d": ones, "h": hot}, {"d": ones, "h": hot}, {"d": ones, "h": np.full_like(hot, 0.1)}]
    patched = [{"d": ones, "h": hot}, {"d": 2 * ones, "h": np.where(np.arange(100).reshape(hot.shape) < 50, 0.9, 0.0)},
               {"d": bump, "h": hot}]
    fid = fidelity(patched, base, {"d": "depth", "h": "heatmap"}, ["a", "b", "c"])
    cosines, errors, ious = [1.0, 1.0, 5 / (2 * np.sqrt(7))], [0.0, 1.0, 0.25], [1.0, 0.5]
    assert [r["cosine"] for r in fid["per_image"]] == pytest.approx(cosines)
    assert [r["depth_rel_error"] for r in fid["per_image"]] == pytest.approx(errors)
    assert fid["cosine_mean"] == pytest.approx(np.mean(cosines)) and fid["cosine_min"] == pytest.approx(min(cosines))
    assert fid["depth_rel_error"] == pytest.approx(np.mean(errors)) and fid["depth_rel_error_max"] == 1.0
    assert [r["heatmap_iou"] for r in fid["per_image"]] == [*ious, None]
    assert fid["heatmap_iou"] == pytest.approx(np.mean(ious)) and fid["heatmap_iou_min"] == min(ious)
    assert fid["heatmap_iou_undefined"] == 1 and "cosine_undefined" not in fid
    assert "heatmap_mae_max" not in fid and "heatmap_mae_min" not in fid


def test_per_image_splits_batches_and_drops_the_images_that_fill_the_last_one():
    first = {"y": np.arange(6.0).reshape(2, 3)}
    last = {"y": np.array([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]])}  # image 4 repeats image 1 to fill the batch
    images = per_image([first, last], 3)
    assert len(images) == 3 and all(i["y"].shape == (1, 3) for i in images)
    np.testing.assert_array_equal(np.concatenate([i["y"] for i in images]), np.arange(9.0).reshape(3, 3))


def _sqrt_runner(name: str):
    from onnx import TensorProto, helper
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return OnnxrtRunner(SessionFromOnnx(model.SerializeToString(), providers=["CPUExecutionProvider"]), name=name)


def test_stream_all_yields_one_image_at_a_time_and_refuses_nan():
    fed = []

    def feeds():  # batches of 2; the last is filled up with image 1, which must not count twice
        for batch in (np.arange(6.0).reshape(2, 3), np.array([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]])):
            fed.append(batch)
            yield {"x": (batch ** 2).astype(np.float32)}

    stream = stream_all([_sqrt_runner("a"), _sqrt_runner("b")], feeds(), 3)
    first = next(stream)
    assert len(fed) == 1, "the second batch ran before the first image was read"
    images = [first, *stream]
    assert len(images) == 3 and all(set(i) == {"a", "b"} and i["b"]["y"].shape == (1, 3) for i in images)
    for runner in ("a", "b"):
        np.testing.assert_allclose(np.concatenate([i[runner]["y"] for i in images]), np.arange(9.0).reshape(3, 3))
    with pytest.raises(ArithmeticError, match="a produced NaN or Inf in y"):
        list(stream_all([_sqrt_runner("a")], [{"x": np.full((2, 3), -1.0, np.float32)}], 2))  # sqrt(-1): NaN


def test_stream_all_counts_every_image_across_several_batches():
    """Five images in batches of 2: the third batch holds one image and a filler. Each batch's images are the count
    still missing, so a miscount of the images seen drops real ones from the later batches."""
    batches = [np.arange(6.0).reshape(2, 3) + 6 * i for i in range(3)]
    batches[2][1] = 0.0  # the filler
    images = list(stream_all([_sqrt_runner("a")], ({"x": (b ** 2).astype(np.float32)} for b in batches), 5))
    assert len(images) == 5
    np.testing.assert_allclose(np.concatenate([i["a"]["y"] for i in images]), np.arange(15.0).reshape(5, 3))


def test_parity_json_names_the_engine_graph_and_the_reference_device_only_when_known():
    base = {"cosine_min": 1.0, "max_abs": 0.0, "passed": True, "cosine_threshold": 0.999, "max_abs_threshold": 1e-3,
            "per_output": {}}
    known = Parity(**base, engine_model="patched.fused.onnx", reference_device="cpu").to_json()
    assert (known["engine_model"], known["reference_device"]) == ("patched.fused.onnx", "cpu")
    assert not {"engine_model", "reference_device"} & set(Parity(**base).to_json())


def test_depth_error_is_relative_at_any_scale_and_top1_agreement_counts_equal_classes():
    depth = np.array([[1.0, 2.0], [3.0, 4.0]])
    off = depth + np.array([[0.5, -0.5], [0.0, 0.0]])
    for scale in (1.0, 1e-3, 1e3):  # inverse depth of far scenes is small: the error is relative to its mean
        assert depth_metrics(off * scale, depth * scale)["depth_rel_error"] == pytest.approx(0.1)
    logits = np.eye(4)[None]  # four positions, classes 0..3
    other = logits.copy()
    other[0, 3] = [5.0, 0.0, 0.0, 0.0]  # the last position now says class 0
    assert classification_metrics(other, logits)["top1_agreement"] == 0.75
    assert classification_metrics(logits, logits)["top1_agreement"] == 1.0


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.conv = nn.Conv2d(3, 4, 2)

    def forward(self, x):
        q = self.lin(x).view(1, 10, 2, 8).transpose(1, 2)
        attn = nn.functional.scaled_dot_product_attention(q, q, q)
        return attn, self.conv(torch.zeros(1, 3, 5, 5))


def test_flops_count_one_per_multiply_add_including_fused_attention():
    got = count_gflops(_Attn(), torch.randn(1, 10, 8)).total * 1e9
    linear = 10 * 8 * 16
    attention = 2 * (2 * 10 * 10 * 8)  # QK^T and AV, 2 heads
    conv = 4 * 4 * 3 * 4 * 2 * 2  # out positions x out ch x in ch x kernel
    assert got == pytest.approx(linear + attention + conv)


def test_clustering_cost_is_reported_separately():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.cluster = TokenClustering((8, 8), (4, 4), 3, 2, 1.0, form="dense")

        def forward(self, x):
            return self.cluster(self.pre(x))

    count = count_gflops(Wrap(), torch.randn(1, 64, 4))
    n, m, c = 64, 16, 4
    expected_cluster = n * m * c * (1 + 2 * 2)  # pooling + 2 iterations x (distances + M-step)
    assert count.clustering * 1e9 == pytest.approx(expected_cluster)
    assert count.total * 1e9 == pytest.approx(expected_cluster + 64 * 4 * 4)


def test_onnx_gflops_counts_matmul_and_einsum_multiply_adds():
    """Einsum's equation arrives from onnx.helper as bytes: counting a graph with one (Mask2Former's decoder)
    once crashed `hgdeploy export` with a TypeError."""
    from onnx import TensorProto, helper

    from hgdeploy.graph.flops import onnx_gflops

    nodes = [helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"),  # [2,3,4] x [4,5]: 2*3*5*4 = 120
             helper.make_node("Einsum", ["h", "b"], ["y"], name="es", equation="bij,bjk->bik")]  # 2*3*5*6 = 180
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
                                           (("a", [2, 3, 4]), ("w", [4, 5]), ("b", [2, 5, 6]))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    count = onnx_gflops(model, lambda n: n.name == "es")
    assert count.total * 1e9 == pytest.approx(300) and count.clustering * 1e9 == pytest.approx(180)
