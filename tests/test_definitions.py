"""Numbers against their definitions, worked out here rather than read off the code: the saliency MAE and max F
(beta^2 = 0.3; maxF is the best F over the 256 thresholds of the precision and recall curves averaged over the
images, the SOD benchmarks' convention SaliencyTotals states), tune's budget bound (the one-sided 90 % bound of
the mean over the photos, Student's t, as the README promises) against scipy.stats, and the softmax-invariant pass
on graphs where a factor varies along the softmax axis."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from scipy import stats

from hgdeploy.core.errors import UserError
from hgdeploy.evaluation.metrics import SaliencyTotals
from hgdeploy.graph.passes import PassContext, drop_softmax_invariant_terms
from hgdeploy.tune.space import parse_budget


def f_beta(p: float, r: float) -> float:
    return 0.0 if p == 0 and r == 0 else 1.3 * p * r / (0.3 * p + r)


# ------------------------------------------------------------------------------------------------- saliency


def test_saliency_mae_and_max_f_over_a_dataset_by_hand():
    """Two 1 x 2 images, each with one salient pixel (the first). Image A ranks it first, image B ranks the other
    pixel first. Thresholds t (map >= t):
      t <= 100:      A P 1/2 R 1,  B P 1/2 R 1   -> mean P 1/2, R 1   -> F 0.65 / 1.15
      100 < t <= 200: A P 1 R 1,   B P 0 R 0     -> mean P 1/2, R 1/2 -> F 0.5
      t > 200:        nothing predicted: P 0 R 0
    maxF = 0.65 / 1.15 = 0.5652; the mean of the per-image maxF, (1 + 0.5652) / 2, would be 0.7826.
    MAE: A (55 + 100) / 255 / 2, B (155 + 200) / 255 / 2, their mean 0.5."""
    mask = np.array([[True, False]])
    a, b = np.array([[200, 100]], np.uint8), np.array([[100, 200]], np.uint8)
    totals = SaliencyTotals()
    one, two = totals.add(mask, a), totals.add(mask, b)
    assert one["maxF"] == pytest.approx(f_beta(1, 1)) and two["maxF"] == pytest.approx(f_beta(0.5, 1))
    assert one["MAE"] == pytest.approx(155 / 255 / 2) and two["MAE"] == pytest.approx(355 / 255 / 2)
    scores = totals.scores()
    assert scores["MAE"] == pytest.approx(0.5)
    assert scores["maxF"] == pytest.approx(max(f_beta(0.5, 1), f_beta(0.5, 0.5)))
    assert scores["maxF"] == pytest.approx(0.65 / 1.15)
    assert scores["maxF"] < (one["maxF"] + two["maxF"]) / 2 - 0.2  # not the mean of per-image maxF


def test_saliency_mae_against_another_models_map_by_hand():
    """With a reference map (another model's 8-bit map as the reference), MAE is the mean |pred - ref| / 255 over
    the pixels, and the F-measure still reads the mask: pred 200, 100 against ref 100, 100 is (100 + 0) / 255 / 2."""
    mask = np.array([[True, False]])
    pred, ref = np.array([[200, 100]], np.uint8), np.array([[100, 100]], np.uint8)
    got = SaliencyTotals().add(mask, pred, ref)
    assert got["MAE"] == pytest.approx(100 / 255 / 2)
    assert got["maxF"] == pytest.approx(f_beta(1, 1))  # t in 101..200: the salient pixel alone


def test_saliency_max_f_averages_each_images_curves_whatever_its_size():
    """Images weigh alike, not pixels. A 1 x 4 image (two salient pixels, the map 200 on them and on one other
    pixel, 50 on the last) and a 1 x 2 image (the map 200 on its salient pixel, 0 on the other):
      t = 0:          big P 2/4 R 1, small P 1/2 R 1 -> mean P 1/2 R 1
      1 <= t <= 50:   big P 2/4 R 1, small P 1 R 1   -> mean P 3/4 R 1
      51 <= t <= 200: big P 2/3 R 1, small P 1 R 1   -> mean P 5/6 R 1  (the best)
      t > 200:        nothing predicted
    Pooling the pixels of both images instead would give P 3/4 at best."""
    totals = SaliencyTotals()
    totals.add(np.array([[True, True, False, False]]), np.array([[200, 200, 200, 50]], np.uint8))
    totals.add(np.array([[True, False]]), np.array([[200, 0]], np.uint8))
    assert totals.scores()["maxF"] == pytest.approx(max(f_beta(1 / 2, 1), f_beta(3 / 4, 1), f_beta(5 / 6, 1)))
    assert totals.scores()["maxF"] > f_beta(3 / 4, 1) + 0.05  # the pixel-pooled curves' best


# ----------------------------------------------------------------------------------------- the tune budget


def _fidelity(values: list[float], key: str = "cosine") -> dict:
    summary_key = "cosine_mean" if key == "cosine" else key
    return {summary_key: float(np.mean(values)), "per_image": [{key: v} for v in values]}


def test_the_budget_bound_is_the_one_sided_90_percent_t_bound_of_the_mean():
    values = [0.991, 0.984, 0.996, 0.979, 0.988, 0.993]
    ttest = stats.ttest_1samp(values, 0.0, alternative="greater")
    lower = ttest.confidence_interval(confidence_level=0.9).low
    budget = parse_budget("cosine>=0.985")
    assert budget.bound(_fidelity(values)) == pytest.approx(lower, rel=1e-12)
    # at the bound, the one-sided t-test of "the mean is above it" has p = 0.10
    assert stats.ttest_1samp(values, lower, alternative="greater").pvalue == pytest.approx(0.10, rel=1e-9)
    assert np.mean(values) > 0.985 > lower  # the plain mean meets the budget, the bound does not
    assert not budget.met(_fidelity(values)) and parse_budget("cosine>=0.985", 0.5).met(_fidelity(values))
    assert parse_budget(f"cosine>={lower - 1e-6}").met(_fidelity(values))


def test_a_budget_on_an_error_takes_the_upper_bound_and_one_image_or_a_worst_case_as_it_is():
    errors = [0.03, 0.05, 0.04, 0.06]
    upper = stats.ttest_1samp(errors, 0.0, alternative="less").confidence_interval(confidence_level=0.9).high
    budget = parse_budget("depth_rel_error<=0.05")
    assert budget.bound(_fidelity(errors, "depth_rel_error")) == pytest.approx(upper, rel=1e-12)
    assert upper > 0.05 > np.mean(errors) and not budget.met(_fidelity(errors, "depth_rel_error"))
    assert budget.bound(_fidelity([0.04], "depth_rel_error")) == 0.04  # one image: no spread to bound
    worst = parse_budget("cosine_min>=0.98")
    assert worst.bound({"cosine_min": 0.981, "per_image": [{"cosine": 0.981}, {"cosine": 0.999}]}) == 0.981


def test_the_budget_bound_of_two_images_is_already_the_t_bound():
    """Two images are the fewest with a spread: the bound is Student's t with one degree of freedom, not the mean."""
    values = [0.99, 0.98]
    lower = stats.ttest_1samp(values, 0.0, alternative="greater").confidence_interval(confidence_level=0.9).low
    assert parse_budget("cosine>=0.985").bound(_fidelity(values)) == pytest.approx(lower, rel=1e-12)
    assert lower < 0.985 - 0.01


def test_a_budget_is_met_at_exactly_its_value_in_either_direction():
    """">=" and "<=" are inclusive: a bound equal to the budget's value meets it, the next float past it does not
    (confidence 0.5: the bound is the plain mean)."""
    for text, at, past in (("cosine>=0.985", 0.985, np.nextafter(0.985, 0)),
                           ("depth_rel_error<=0.05", 0.05, np.nextafter(0.05, 1))):
        budget, key = parse_budget(text, 0.5), text.split("<")[0].split(">")[0]
        assert budget.met(_fidelity([at], key)) and not budget.met(_fidelity([past], key))


@pytest.mark.parametrize("confidence", [0.4999, 1.0, 1.5])
def test_a_budget_confidence_outside_half_to_one_is_refused(confidence):
    """--confidence is a one-sided level: 0.5 (the plain mean) up to, not including, 1 (an infinite bound)."""
    with pytest.raises(UserError, match="--confidence"):
        parse_budget("cosine>=0.985", confidence)
    assert parse_budget("cosine>=0.985", 0.5).confidence == 0.5 and parse_budget("cosine>=0.985", 0.999)


# ------------------------------------------------------------------------------------- the softmax pass


def _vi(name: str, shape: list[int]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _scaled_softmax(op: str, factor_first: bool) -> onnx.ModelProto:
    """softmax((x + c) op f) over the last axis: c [1, 4, 1] is constant along it, f [1, 4, 3] is not, so c is
    inside a term that varies along the axis and must stay."""
    scaled = ["f", "xc"] if factor_first else ["xc", "f"]
    nodes = [helper.make_node("Add", ["x", "c"], ["xc"], name="add_c"),
             helper.make_node(op, scaled, ["logits"], name="scale"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 4, 3]), _vi("c", [1, 4, 1]), _vi("f", [1, 4, 3])],
                              [_vi("y", [1, 4, 3])])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize(("op", "factor_first"), [("Mul", False), ("Mul", True), ("Div", False)])
def test_a_term_scaled_by_a_factor_that_varies_along_the_axis_is_kept(op, factor_first):
    model = _scaled_softmax(op, factor_first)
    ctx = PassContext({}, [])
    out = gs.export_onnx(drop_softmax_invariant_terms(gs.import_onnx(model), ctx))
    out.ir_version = model.ir_version
    assert [n.op_type for n in out.graph.node] == ["Add", op, "Softmax"]
    assert "removed 0" in ctx.notes[0]
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, 4, 3)).astype(np.float32),
            "c": rng.standard_normal((1, 4, 1)).astype(np.float32) * 3,
            "f": rng.uniform(0.5, 2.0, (1, 4, 3)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, feed), _run(model, feed), rtol=1e-6, atol=1e-7)
    stripped = dict(feed, c=np.zeros_like(feed["c"]))  # what dropping c would compute: visibly different
    assert np.abs(_run(model, stripped) - _run(model, feed)).max() > 1e-2
