"""TensorRT lint: tiny graphs that each break (or respect) one rule, and a real export that must lint clean."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hgdeploy.core.errors import UserError
from hgdeploy.graph.lint import SUPPORT, SUPPORTED_MAJORS, Finding, format_findings, lint_model, lint_path

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), check=True, domains=None):
    """Opset-18 model from (name, type, shape) inputs/outputs and numpy initializers; checked when `check`."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in inits],
    )
    opsets = [helper.make_opsetid(d, v) for d, v in {"": 18, **(domains or {})}.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _topk(k_init=None, n=16):
    """x[1, n] -> TopK "tk" with K from an initializer (or a graph input when k_init is None)."""
    inits = [("k", np.array([k_init], dtype=np.int64))] if k_init is not None else []
    inputs = [("x", F, [1, n])] + ([] if k_init is not None else [("k", I64, [1])])
    k_out = k_init if k_init is not None else "K"
    return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="tk")], inputs,
                  [("v", F, [1, k_out]), ("i", I64, [1, k_out])], inits)


def _einsum(equation, a_shape, b_shape, out_shape, check=True):
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="es", equation=equation)
    return _model([node], [("a", F, a_shape), ("b", F, b_shape)], [("y", F, out_shape)], check=check)


def _reasons(findings, op_type):
    return [f.reason for f in findings if f.op_type == op_type]


def test_clean_graph_has_no_findings():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "m"], ["mm"], name="matmul"),
        helper.make_node("Softmax", ["mm"], ["p"], name="softmax", axis=-1),
        helper.make_node("TopK", ["p", "k"], ["v", "i"], name="tk"),
    ]
    model = _model(nodes, [("x", F, [1, 3, 8, 8])], [("v", F, [1, 4, 5]), ("i", I64, [1, 4, 5])], [
        ("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        ("shape", np.array([1, 4, 64], dtype=np.int64)),
        ("m", rng.standard_normal((64, 16)).astype(np.float32)),
        ("k", np.array([5], dtype=np.int64)),
    ])
    assert lint_model(model) == []
    assert lint_model(model, trt_major=10) == []


def test_opset_18_is_beyond_tensorrt_8():
    findings = lint_model(_topk(5), trt_major=8)
    assert findings == [Finding("", "", "opset 18 is outside what TensorRT 8.6's parser imports (1 to 17)")]
    assert format_findings(findings) == "model: opset 18 is outside what TensorRT 8.6's parser imports (1 to 17)"


@pytest.mark.parametrize("reduction,rejected", [("add", True), ("mul", True), ("none", False)])
def test_scatter_nd_reduction(reduction, rejected):
    node = helper.make_node("ScatterND", ["d", "idx", "u"], ["y"], name="sc", reduction=reduction)
    model = _model([node], [("d", F, [4, 4]), ("u", F, [2, 4])], [("y", F, [4, 4])],
                   [("idx", np.array([[0], [2]], dtype=np.int64))])
    findings = lint_model(model)
    if rejected:
        assert findings == [Finding("sc", "ScatterND", f'reduction="{reduction}" is not supported (only "none")')]
        assert format_findings(findings).startswith('ScatterND node "sc" (ScatterND): reduction=')
    else:
        assert findings == []


def test_scatter_elements_reduction_needs_tensorrt_10():
    node = helper.make_node("ScatterElements", ["d", "idx", "u"], ["y"], name="se", reduction="add", axis=0)
    model = _model([node], [("d", F, [4, 4]), ("u", F, [1, 4])], [("y", F, [4, 4])],
                   [("idx", np.zeros((1, 4), dtype=np.int64))])
    assert lint_model(model, 10) == []
    assert 'reduction="add" needs TensorRT 10' in _reasons(lint_model(model, 8), "ScatterElements")[0]


def test_topk_k_5000_is_rejected_with_its_value():
    findings = lint_model(_topk(5000, n=6000))
    assert findings == [Finding("tk", "TopK", "K=5000 is not below TensorRT's limit 3840")]
    assert format_findings(findings) == 'TopK node "tk" (TopK): K=5000 is not below TensorRT\'s limit 3840'


@pytest.mark.parametrize("k,ok", [(3839, True), (3840, False)])
def test_topk_limit_boundary(k, ok):
    assert (lint_model(_topk(k, n=4000)) == []) == ok


def test_topk_runtime_k_is_rejected():
    reasons = _reasons(lint_model(_topk(None)), "TopK")
    assert reasons == ['K comes from tensor "k", computed at run time; the toolkit requires a constant K']


def test_topk_constant_node_k_is_accepted():
    nodes = [helper.make_node("Constant", [], ["k"], name="kc", value=numpy_helper.from_array(np.array([3], np.int64))),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="tk")]
    model = _model(nodes, [("x", F, [1, 8])], [("v", F, [1, 3]), ("i", I64, [1, 3])])
    assert lint_model(model) == []


def test_nonzero_is_a_data_dependent_shape():
    model = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [("x", F, [2, 3])], [("y", I64, [2, None])])
    findings = lint_model(model)
    assert any(f.op_type == "NonZero" and f.node == "nz" and f.reason.startswith("data-dependent shape")
               for f in findings)
    assert any(f.op_type == "" and f.node == "y" and "not static" in f.reason for f in findings)


def test_col2im_is_unsupported_in_every_major():
    node = helper.make_node("Col2Im", ["x", "image_shape", "block_shape"], ["y"], name="c2i")
    model = _model([node], [("x", F, [1, 4, 9])], [("y", F, [1, 1, 4, 4])],
                   [("image_shape", np.array([4, 4], np.int64)), ("block_shape", np.array([2, 2], np.int64))])
    for major in SUPPORTED_MAJORS:
        reasons = _reasons(lint_model(model, major), "Col2Im")
        assert reasons == [f"unsupported op: TensorRT {major}'s ONNX parser does not support Col2Im"]


def test_einsum_ellipsis_is_rejected():
    findings = lint_model(_einsum("...ij,...jk->...ik", [2, 3, 4], [2, 4, 5], [2, 3, 5]))
    assert len(findings) == 1 and findings[0].op_type == "Einsum" and findings[0].node == "es"
    assert "ellipsis" in findings[0].reason


def test_einsum_explicit_batch_passes():
    assert lint_model(_einsum("bij,bjk->bik", [2, 3, 4], [2, 4, 5], [2, 3, 5])) == []


def test_einsum_broadcasting_and_diagonal_are_rejected():
    broadcast = _reasons(lint_model(_einsum("bij,bjk->bik", [1, 3, 4], [2, 4, 5], [2, 3, 5], check=False)), "Einsum")
    assert len(broadcast) == 1 and 'label "b" has sizes [1, 2]' in broadcast[0]
    diagonal = _reasons(lint_model(_einsum("iij,jk->ik", [3, 3, 4], [4, 5], [3, 5])), "Einsum")
    assert len(diagonal) == 1 and "diagonal" in diagonal[0]


def test_custom_domain_op_is_rejected():
    node = helper.make_node("MyPlugin", ["x"], ["y"], name="plug", domain="com.acme")
    model = _model([node], [("x", F, [1, 4])], [("y", F, [1, 4])], check=False, domains={"com.acme": 1})
    assert _reasons(lint_model(model), "MyPlugin") == ['custom op in domain "com.acme": TensorRT needs a plugin for it']


def test_ai_onnx_domain_is_the_default_domain():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r", domain="ai.onnx")],
                   [("x", F, [1, 4])], [("y", F, [1, 4])], check=False, domains={"ai.onnx": 18})
    assert lint_model(model) == []


def test_dynamic_input_dim_is_rejected():
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    model = _model([node], [("x", F, ["batch", 3])], [("y", F, ["batch", 3])])
    findings = lint_model(model)
    assert Finding("x", "", 'dimension 0 is "batch" (?x3), not static; the toolkit requires static shapes') in findings
    assert {f.node for f in findings} == {"x", "y"}
    assert format_findings(findings).splitlines()[0].startswith('tensor "x": dimension 0 is "batch"')


def test_int16_tensors_are_rejected_double_is_cast_down():
    int16 = _model([helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                   [("a", TensorProto.INT16, [2]), ("b", TensorProto.INT16, [2])], [("y", TensorProto.INT16, [2])])
    assert {f.node for f in lint_model(int16)} == {"a", "b", "y"}
    assert all("INT16 tensors are not supported" in f.reason for f in lint_model(int16))
    # operators.md: "limited support for DOUBLE type. TensorRT will attempt to cast DOUBLE down to FLOAT".
    double = _model([helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                    [("a", TensorProto.DOUBLE, [2]), ("b", TensorProto.DOUBLE, [2])], [("y", TensorProto.DOUBLE, [2])])
    assert lint_model(double) == []


def test_op_types_come_from_the_matrix():
    model = _model([helper.make_node("Erf", ["x"], ["y"], name="erf")], [("x", TensorProto.INT32, [2])],
                   [("y", TensorProto.INT32, [2])], check=False)
    assert _reasons(lint_model(model), "Erf") == [
        "Erf on INT32 tensors is not supported (the matrix lists FP32, FP16, BF16)"]


def test_resize_cubic_inner_dims_passes_antialias_does_not():
    def resize(**attrs):
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="rs", mode="cubic", **attrs)
        return _model([node], [("x", F, [1, 2, 8, 8])], [("y", F, [1, 2, 4, 4])],
                      [("sizes", np.array([1, 2, 4, 4], np.int64))])

    assert lint_model(resize()) == []
    assert _reasons(lint_model(resize(antialias=1)), "Resize") == ["antialias=1 is not supported"]


def test_unknown_major_is_a_user_error():
    with pytest.raises(UserError, match=r"supported: 8, 10") as e:
        lint_model(_topk(5), trt_major=9)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        lint_path("/nonexistent.onnx", trt_major=7)


def test_lint_path_reads_a_file(tmp_path):
    path = tmp_path / "tk.onnx"
    onnx.save(_topk(5000, n=6000), str(path))
    assert lint_path(path) == [Finding("tk", "TopK", "K=5000 is not below TensorRT's limit 3840")]


def test_lint_path_reads_constants_from_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_topk(5000, n=6000), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].raw_data
    assert _reasons(lint_path(path), "TopK") == ["K=5000 is not below TensorRT's limit 3840"]


def test_local_functions_need_tensorrt_9_and_are_linted_inside():
    body = [helper.make_node("TopK", ["data", "count"], ["values", "i"], name="inner")]
    function = helper.make_function("local", "Top", ["data", "count"], ["values"], body, [helper.make_opsetid("", 18)])
    call = helper.make_node("Top", ["x", "k"], ["v"], name="call", domain="local")
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", F, [1, 6000])],
                              [helper.make_tensor_value_info("v", F, [1, 5000])],
                              [numpy_helper.from_array(np.array([5000], np.int64), "k")])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    assert lint_model(model, 10) == [Finding("call/inner", "TopK", "K=5000 is not below TensorRT's limit 3840")]
    assert _reasons(lint_model(model, 8), "Top") == ['ONNX local function "local.Top" needs TensorRT 9 or newer']


@pytest.mark.parametrize("else_len,ok", [(2, True), (3, False)])
def test_if_is_rejected_only_when_its_output_shape_is_not_static(else_len, ok):
    def branch(name, n):
        const = helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.zeros(n, np.float32)))
        return helper.make_graph([const], name, [], [helper.make_tensor_value_info(name, F, [n])])

    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("t", 2),
                            else_branch=branch("e", else_len))
    model = _model([node], [("c", TensorProto.BOOL, [])], [("y", F, None)], check=False)
    findings = lint_model(model)
    assert (findings == []) == ok
    if not ok:
        assert _reasons(findings, "If") == ['data-dependent shape: output "y" of If has no static shape']


def test_lint_path_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file") as e:
        lint_path(tmp_path / "missing.onnx")
    assert "missing.onnx" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("junk", [b"this is not an onnx model\n", b"\x00\xff" * 64, b""])
def test_lint_path_junk_file(tmp_path, junk):
    path = tmp_path / "junk.onnx"
    path.write_bytes(junk)
    with pytest.raises(UserError, match="not an ONNX model") as e:
        lint_path(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("op", ["NonZero", "Unique"])
def test_the_contracts_data_dependent_ops_are_findings(op):
    """Export refuses these ops (contract.static_shape_problems); lint must name them too."""
    from hgdeploy.core.contract import ALWAYS_DATA_DEPENDENT, static_shape_problems

    assert op in ALWAYS_DATA_DEPENDENT
    model = _model([helper.make_node(op, ["x"], ["y"], name="dd")], [("x", F, [4])], [("y", I64, None)], check=False)
    assert any("data-dependent" in f.reason for f in lint_model(model))
    assert any(op in p for p in static_shape_problems(model))


def test_tensorrt_10_table_has_what_our_exporter_emits():
    emitted = {"MatMul", "Add", "Gemm", "LayerNormalization", "Softmax", "Reshape", "Transpose", "Gather", "Einsum",
               "TopK", "Where", "IsNaN", "Erf", "Concat", "Slice", "Resize", "ConvTranspose", "BatchNormalization",
               "Conv", "Mul", "Div", "Sub", "Neg", "ReduceSum", "Squeeze", "Unsqueeze", "Sigmoid", "Relu", "Cast"}
    table = SUPPORT[10].ops
    assert {op for op in emitted if op not in table or table[op].since_minor} == set()


class _LinearSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return (torch.softmax(self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x)))), dim=-1),)


def test_exported_torch_model_lints_clean(tmp_path):
    """Guards against a table stricter than what our own exporter emits."""
    from hgdeploy.patch.export import export_onnx

    torch.manual_seed(0)
    path = export_onnx(_LinearSoftmax().eval(), torch.randn(2, 5, 16), tmp_path / "m.onnx", ("y",))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"LayerNormalization", "Softmax"} <= ops
    assert lint_path(path) == [], format_findings(lint_path(path))


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
def test_lint_reports_a_graph_onnx_checker_rejects(tmp_path, runtime):
    """A Relu reading a tensor nothing defines: onnx.checker rejects it, so lint must not call it clean (it did)."""
    from hgdeploy.graph.lint import lint_runtime_path

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["undefined"], ["y"], name="relu")], "broken", [x], [y])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    findings = lint_path(path) if runtime == "tensorrt" else lint_runtime_path(path)
    assert findings and findings[0].reason.startswith("onnx.checker rejects the graph"), findings
    assert "undefined" in findings[0].reason
