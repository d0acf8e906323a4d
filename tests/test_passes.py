"""Each graph pass on a tiny graph built in code: the test fails when the pass is removed or broken."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hgdeploy.core.contract import (FP16_MARKER, FP32_MARKER, ExportError, infer_shapes, is_fp32_layer_node, is_layer_node,
                                   read_clustering_specs, without_weights)
from hgdeploy.graph.passes import (
    FP16_MAX,
    PASSES,
    PassContext,
    _along,
    check_static,
    drop_softmax_invariant_terms,
    fold_constants,
    fp16_safe_masks,
    import_graph,
    mark_precision,
    optimize,
)
from hgdeploy.layers import TokenClustering, TokenReconstruction
from hgdeploy.patch.export import export_onnx


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(inits))
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _apply(fn, model, scopes=None, specs=None):
    ctx = PassContext(scopes or {}, specs or [])
    graph = fn(gs.import_onnx(model), ctx)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out, ctx


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_fold_constants_evaluates_constant_arithmetic():
    a = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full((4,), 3.0, np.float32), "b")
    model = _model([helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
                    helper.make_node("Add", ["x", "ab"], ["y"], name="add")], [_vi("x", [4])], [_vi("y", [4])], [a, b])
    out, _ = _apply(fold_constants, model)
    assert _ops(out) == ["Add"]
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x + 6)


def test_fold_constants_leaves_results_over_the_size_limit_to_the_engine(monkeypatch):
    import hgdeploy.graph.passes as passes

    a = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "a")
    big = numpy_helper.from_array(np.array([64, 4], np.int64), "big")  # the Expand's result: 64 x 4 floats
    model = _model([helper.make_node("Expand", ["a", "big"], ["table"], name="expand"),
                    helper.make_node("Add", ["x", "table"], ["y"], name="add")],
                   [_vi("x", [64, 4])], [_vi("y", [64, 4])], [a, big])
    monkeypatch.setattr(passes, "FOLD_MAX_BYTES", 64 * 4 * 4 - 1)
    out, _ = _apply(fold_constants, model)
    assert _ops(out) == ["Expand", "Add"]
    monkeypatch.setattr(passes, "FOLD_MAX_BYTES", 64 * 4 * 4)
    out, _ = _apply(fold_constants, model)
    assert _ops(out) == ["Add"]
    x = np.ones((64, 4), np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x + 2)


def _softmax_with_norm_term(axis=-1):
    """softmax(||x||^2 + c - t): the ||x||^2 term is [1, 4, 1], constant along the softmax axis."""
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["xx"], name="sq"),
        helper.make_node("ReduceSum", ["xx", "axes"], ["zz"], keepdims=1, name="norm"),
        helper.make_node("Add", ["zz", "c"], ["d"], name="add_norm"),
        helper.make_node("Sub", ["d", "t"], ["logits"], name="sub"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=axis, name="softmax"),
    ]
    return _model(nodes, [_vi("x", [1, 4, 3]), _vi("c", [1, 4, 3]), _vi("t", [1, 4, 3])], [_vi("y", [1, 4, 3])], [axes])


def test_drop_softmax_invariant_terms_removes_the_norm_and_keeps_the_result():
    model = _softmax_with_norm_term()
    out, ctx = _apply(drop_softmax_invariant_terms, model)
    assert "ReduceSum" not in _ops(out) and "Add" not in _ops(out)
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal((1, 4, 3)).astype(np.float32) for k in "xct"}
    np.testing.assert_allclose(_run(out, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)
    assert "removed 1" in ctx.notes[0]


def test_drop_softmax_invariant_terms_keeps_terms_that_vary_along_the_axis():
    model = _softmax_with_norm_term(axis=1)  # over the 4 tokens, ||x||^2 [1, 4, 1] varies: must stay
    out, _ = _apply(drop_softmax_invariant_terms, model)
    assert "ReduceSum" in _ops(out)


def test_a_term_is_dropped_only_where_it_broadcasts_along_the_softmax_axis():
    """softmax over axis 1 of [1, 4, 3] logits = (x + b) + c: c [3] broadcasts along axes 0 and 1 (a lower rank
    counts from the right), so the softmax cannot see it; b [4, 3] has the same rank as the axes it covers and
    varies along axis 1: it stays."""
    nodes = [helper.make_node("Add", ["x", "b"], ["xb"], name="add_b"),
             helper.make_node("Add", ["xb", "c"], ["logits"], name="add_c"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1, name="softmax")]
    model = _model(nodes, [_vi("x", [1, 4, 3]), _vi("b", [4, 3]), _vi("c", [3])], [_vi("y", [1, 4, 3])])
    out, ctx = _apply(drop_softmax_invariant_terms, model)
    assert "removed 1" in ctx.notes[0] and [n.name for n in out.graph.node] == ["add_b", "softmax"]
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((1, 4, 3)).astype(np.float32), "b": 3 * rng.standard_normal((4, 3)).astype(
        np.float32), "c": 3 * rng.standard_normal(3).astype(np.float32)}
    np.testing.assert_allclose(_run(out, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, factor_first", [("Mul", True), ("Mul", False), ("Div", False)])
def test_a_term_inside_a_product_or_quotient_with_a_constant_factor_is_dropped(op, factor_first):
    """softmax(f * (x + n)), softmax((x + n) * f) and softmax((x + n) / f) with f a scalar constant and n [1, 4, 1]
    constant along the last axis: f * n (n / f) is an additive term the softmax cannot see, whichever side of the
    Mul the factor is written on (the clustering's E-step divides its distances by tau)."""
    f = numpy_helper.from_array(np.array([0.5], np.float32), "f")
    nodes = [helper.make_node("Add", ["x", "n"], ["xn"], name="add_n"),
             helper.make_node(op, ["f", "xn"] if factor_first else ["xn", "f"], ["logits"], name="scale"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")]
    model = _model(nodes, [_vi("x", [1, 4, 3]), _vi("n", [1, 4, 1])], [_vi("y", [1, 4, 3])], [f])
    out, ctx = _apply(drop_softmax_invariant_terms, model)
    assert "removed 1" in ctx.notes[0] and _ops(out) == [op, "Softmax"]
    rng = np.random.default_rng(3)
    feed = {"x": rng.standard_normal((1, 4, 3)).astype(np.float32), "n": 5 * rng.standard_normal((1, 4, 1)).astype(
        np.float32)}
    np.testing.assert_allclose(_run(out, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)


def test_a_lower_rank_term_is_constant_along_the_axes_it_lacks():
    """Broadcasting aligns shapes from the right: a [5, 1] term of a rank-3 result covers axes 1 and 2, so it is
    constant along axis 0 (given as 0 or as -3), and along axis 2, but not along axis 1."""
    term = gs.Variable("t", dtype=np.float32, shape=[5, 1])
    assert _along(term, 0, 3) and _along(term, -3, 3) and _along(term, 2, 3)
    assert not _along(term, 1, 3) and not _along(term, -2, 3)


def test_import_graph_reads_external_weights_from_the_graphs_folder_not_the_working_directory(tmp_path, monkeypatch):
    """An export of a big model keeps its weights in `<graph>.onnx.data`: the passes read them from the graph's
    folder wherever the command runs (graph-surgeon alone looks in the working directory)."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    model = _model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [_vi("x", [4])], [_vi("y", [4])], [w])
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    graph = import_graph(onnx.load(folder / "m.onnx", load_external_data=False), folder)
    np.testing.assert_array_equal(graph.tensors()["w"].values, np.arange(4, dtype=np.float32))


def test_import_graph_types_every_tensor_from_shape_inference():
    """A graph saved without value_info (onnx.helper writes none): graph-surgeon alone leaves the intermediate
    tensors untyped; import_graph gives each the type and shape onnx's own shape inference gives it, and keeps
    what the file declares."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0, name="sum")]
    graph = helper.make_graph(nodes, "t", [_vi("x", [2, 3])], [_vi("y", [])],
                              initializer=[numpy_helper.from_array(np.ones((3, 5), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert gs.import_onnx(model).tensors()["h"].dtype is None  # what the passes would see without it
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert inferred == {"h": [2, 5], "r": [2, 5]}
    tensors = import_graph(model).tensors()
    for name, shape in inferred.items():
        assert tensors[name].dtype == np.float32 and list(tensors[name].shape) == shape
    assert list(tensors["x"].shape) == [2, 3] and list(tensors["y"].shape) == []
    assert isinstance(tensors["w"], gs.Constant) and tensors["w"].values.shape == (3, 5)


def _export_clustering(tmp_path, form):
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clustering = TokenClustering((12, 12), (6, 6), 5, 3, 1.0, form=form)
            self.reconstruction = TokenReconstruction(4, 1.0)

        def forward(self, z):
            s = self.clustering(z)
            return (self.reconstruction(s + 1, z, s),)

    z = torch.randn(1, 144, 8)
    path = export_onnx(Wrap().eval(), z, tmp_path / f"{form}.onnx", ("y",))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    return model, {"pixel_values": z.numpy()}


def test_fp16_safe_masks_replaces_huge_penalties():
    penalty = np.zeros((1, 4, 3), np.float32)
    penalty[0, :, 2] = 1e16
    model = _model([helper.make_node("Sub", ["x", "p"], ["logits"], name="mask"),
                    helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")],
                   [_vi("x", [1, 4, 3])], [_vi("y", [1, 4, 3])], [numpy_helper.from_array(penalty, "p")])
    out, _ = _apply(fp16_safe_masks, model, {"mask": ["c"], "softmax": ["c"]}, [{"scope": "c", "kind": "clustering"}])
    assert "Where" in _ops(out)
    constants = [numpy_helper.to_array(i) for i in out.graph.initializer] + [
        numpy_helper.to_array(a.t) for n in out.graph.node for a in n.attribute if a.name == "value"]
    assert all(np.abs(c.astype(np.float64)).max() <= FP16_MAX for c in constants if c.dtype.kind == "f")
    x = np.random.default_rng(1).standard_normal((1, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], _run(model, {"x": x})[0], atol=1e-7)


def _masked(op, value, masks=1):
    """softmax over the last axis of x op p, `masks` times over (each a [1, 4, 3] penalty with `value` in its last
    column, all alike), summed: what the exporter writes once per clustering iteration."""
    penalty = np.zeros((1, 4, 3), np.float32)
    penalty[0, :, 2] = value
    nodes, inits, outs = [], [], []
    for i in range(masks):
        nodes += [helper.make_node(op, ["x", f"p{i}"], [f"l{i}"], name=f"mask{i}"),
                  helper.make_node("Softmax", [f"l{i}"], [f"s{i}"], axis=-1, name=f"softmax{i}")]
        inits.append(numpy_helper.from_array(penalty, f"p{i}"))
        outs.append(f"s{i}")
    nodes.append(helper.make_node("Sum", outs, ["y"], name="sum"))
    scopes = {n.name: ["", "c"] for n in nodes}
    return _model(nodes, [_vi("x", [1, 4, 3])], [_vi("y", [1, 4, 3])], inits), scopes


@pytest.mark.parametrize(("op", "value"), [("Sub", 1e16), ("Add", -1e16), ("Add", 1e16), ("Sub", -1e16)])
def test_fp16_safe_masks_fills_on_the_side_the_penalty_pushes(op, value):
    """x - 1e16 and x + -1e16 push the masked logits down (a mask); x + 1e16 and x - -1e16 push them up (the masked
    entries take the whole softmax): the Where's fill must keep that side, and the result."""
    model, scopes = _masked(op, value)
    out, _ = _apply(fp16_safe_masks, model, scopes, [{"scope": "c", "kind": "clustering"}])
    assert "Where" in _ops(out)
    x = np.random.default_rng(4).standard_normal((1, 4, 3)).astype(np.float32)
    want = _run(model, {"x": x})[0]
    assert (want[..., 2] > 0.99).all() == ((value > 0) == (op == "Add"))  # which side this case is on
    np.testing.assert_allclose(_run(out, {"x": x})[0], want, atol=1e-7)


def test_fp16_safe_masks_counts_what_it_rewrote_and_shares_one_keep_constant():
    model, scopes = _masked("Sub", 1e16, masks=3)
    out, ctx = _apply(fp16_safe_masks, model, scopes, [{"scope": "c", "kind": "clustering"}])
    wheres = [n for n in out.graph.node if n.op_type == "Where"]
    assert len(wheres) == 3 and ctx.notes == ["fp16_safe_masks: rewrote 3 masking penalties"]
    assert len({n.input[0] for n in wheres}) == 1  # one keep mask for the three
    _, ctx = _apply(fp16_safe_masks, *_masked("Sub", 1e16), [{"scope": "c", "kind": "clustering"}])
    assert ctx.notes == ["fp16_safe_masks: rewrote 1 masking penalty"]


def test_fp16_safe_masks_accepts_the_fp16_maximum_and_refuses_what_lies_beyond():
    """65504 is float16's largest finite value: a clustering constant holding it is safe; 70000 is not (and is no
    masking penalty, whose other entries are 0, so the pass cannot rewrite it)."""
    assert FP16_MAX == float(np.finfo(np.float16).max)
    for value, safe in ((FP16_MAX, True), (-FP16_MAX, True), (7e4, False)):
        c = numpy_helper.from_array(np.array([1.0, value], np.float32), "k")
        model = _model([helper.make_node("Mul", ["x", "k"], ["y"], name="scale")], [_vi("x", [2])], [_vi("y", [2])],
                       [c])
        if safe:
            _apply(fp16_safe_masks, model, {"scale": ["", "c"]}, [{"scope": "c", "kind": "clustering"}])
        else:
            with pytest.raises(ExportError, match="outside fp16 range"):
                _apply(fp16_safe_masks, model, {"scale": ["", "c"]}, [{"scope": "c", "kind": "clustering"}])


def test_mark_precision_marks_only_the_layers_and_their_fp16_safe_sums_apart():
    model = _softmax_with_norm_term()
    scopes = {"sub": ["", "enc.clustering"], "softmax": ["", "enc.clustering", "enc.clustering.fp16_mix"],
              "sq": ["", "enc.block"]}
    out, ctx = _apply(mark_precision, model, scopes, [{"scope": "enc.clustering", "kind": "clustering"}])
    assert ctx.notes == ["mark_precision: 1 nodes kept in fp32, 1 fp16-safe"]
    names = {n.name for n in out.graph.node}
    assert f"{FP32_MARKER}/sub" in names and f"{FP16_MARKER}/softmax" in names and "sq" in names
    in_layer, fp32 = is_layer_node(out), is_fp32_layer_node(out)
    assert {(n.name, in_layer(n), fp32(n)) for n in out.graph.node if n.name.startswith("hgdeploy")} == {
        (f"{FP32_MARKER}/sub", True, True), (f"{FP16_MARKER}/softmax", True, False)}


def test_shape_inference_without_the_weights_gives_the_shapes_inference_with_them_gives():
    weight = numpy_helper.from_array(np.random.rand(64, 32).astype(np.float32), "w")  # 2048 elements: a weight
    shape = numpy_helper.from_array(np.array([1, 4, 8], np.int64), "shape")  # small: data inference must read
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "t", [_vi("x", [1, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[weight, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    light = without_weights(model)
    assert [i.name for i in light.graph.initializer] == ["shape"] and [i.name for i in light.graph.input] == ["x", "w"]
    assert len(model.graph.initializer) == 2  # a copy: the model keeps its weights

    def shapes(m):
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(m.graph.value_info) + list(m.graph.output)}

    ours = infer_shapes(model)
    assert shapes(ours) == shapes(onnx.shape_inference.infer_shapes(model, data_prop=True)) == {"h": [1, 32], "y": [1, 4, 8]}
    assert [i.name for i in ours.graph.input] == ["x"]
    assert [numpy_helper.to_array(i).tobytes() for i in ours.graph.initializer] == [
        numpy_helper.to_array(i).tobytes() for i in model.graph.initializer]


def test_check_static_refuses_data_dependent_shapes():
    model = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x", [4])],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    with pytest.raises(ExportError, match="NonZero"):
        _apply(check_static, model)


@pytest.mark.parametrize("form", ["dense", "local"])
def test_the_full_list_keeps_parity_metadata_and_the_patch_time_form(tmp_path, form):
    """The form is chosen once, when the model is patched: the passes keep it (dense stays dense)."""
    model, feed = _export_clustering(tmp_path, form)
    out, notes = optimize(model)
    assert [name for name, _ in PASSES][0] == "fold_constants" and len(notes) == len(PASSES)
    assert read_clustering_specs(out) == read_clustering_specs(model)
    assert read_clustering_specs(out)[0]["form"] == form
    shapes = [tuple(i.dims) for i in out.graph.initializer]
    assert ((144, 36) in shapes) == (form == "dense")  # the dense form's [N, M] mask, as a Where condition
    np.testing.assert_allclose(_run(out, feed)[0], _run(model, feed)[0], rtol=1e-4, atol=1e-4)
