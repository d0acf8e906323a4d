"""Export: static, checked ONNX that ONNX Runtime runs with parity to PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hgdeploy.adapters.dinov2 import patch_dinov2
from hgdeploy.checks import cosine
from hgdeploy.contract import INPUT_NAME, static_shape_problems
from hgdeploy.export import export_onnx
from hgdeploy.layers import TokenClustering, TokenReconstruction, neighbour_table
from hgdeploy.plan import ClusterPlan


class _Tokens(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return (self.backbone(pixel_values=x).last_hidden_state,)


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x.numpy()})


@pytest.mark.parametrize("grid,reconstruction", [((6, 6), "softmax"), ((5, 7), "official")])
def test_patched_dinov2_exports_static_and_matches_torch(tiny_dinov2, tmp_path, grid, reconstruction):
    model = copy.deepcopy(tiny_dinov2)
    plan = ClusterPlan(token_grid=(8, 8), grid=grid, alpha=1, reconstruct_after=3, depth=4, neighbours=3, iters=3,
                       tau=0.5, k=4, reconstruction=reconstruction)
    patch_dinov2(model, plan)
    wrapped = _Tokens(model).eval()
    x = torch.randn(1, 3, 112, 112)
    path = export_onnx(wrapped, x, tmp_path / "patched.onnx", ("tokens",))
    graph = onnx.load(str(path))
    assert static_shape_problems(graph) == []
    ops = {n.op_type for n in graph.graph.node}
    assert "NonZero" not in ops and "ScatterND" not in ops
    with torch.no_grad():
        ref = wrapped(torch.randn(1, 3, 112, 112) * 0 + x)[0].numpy()
    assert cosine(_ort(path, x)[0], ref) >= 0.9999
    assert not (tmp_path / ".patched.onnx.tmp").exists()


@pytest.mark.parametrize("form,candidates", [("dense", "nearest"), ("local", "nearest"), ("local", "neighbourhood")])
def test_non_divisible_clustering_exports(tmp_path, form, candidates):
    """32 -> 24 cells: adaptive pooling that torch's own ONNX export refuses."""
    cells = neighbour_table((32, 32), (24, 24), 5) if candidates == "neighbourhood" else None

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = TokenClustering((32, 32), (24, 24), 5, 2, 1.0, form=form)
            self.r = TokenReconstruction(4, 1.0, neighbourhood=cells)

        def forward(self, z):
            s = self.c(z)
            return (self.r(s * 2, z, s),)

    z = torch.randn(1, 1024, 16)
    path = export_onnx(Layers().eval(), z, tmp_path / "layers.onnx", ("out",))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: z.numpy()})[0]
    with torch.no_grad():
        ref = Layers().eval()(z)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    graph = onnx.load(str(path))
    assert static_shape_problems(graph) == []
    assert ("TopK" in {n.op_type for n in graph.graph.node}) == (candidates == "nearest")


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_static_check_flags_nonzero_and_runtime_topk():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    model = _graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [x], [y])
    assert any("NonZero" in p for p in static_shape_problems(model))

    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2])
    model = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="tk")], [x, k], [v, i])
    assert any("runtime-computed k" in p for p in static_shape_problems(model))

    kc = helper.make_tensor("kc", TensorProto.INT64, [1], [2])
    model = _graph([helper.make_node("TopK", ["x", "kc"], ["v", "i"], name="tk")], [x], [v, i], [kc])
    assert static_shape_problems(model) == []


def test_graph_passes_refuse_external_data_graphs_with_a_user_error(tmp_path):
    """Over 2 GB the weights live in a .data file; the in-memory passes say so instead of crashing."""
    from hgdeploy.errors import UserError
    from hgdeploy.deploy import optimize_graph, passes_unsupported

    paths = {"patched": tmp_path / "patched.onnx"}
    paths["patched"].write_bytes(b"")
    assert passes_unsupported(paths) is None
    (tmp_path / "patched.onnx.data").write_bytes(b"")
    assert "patched.onnx.data" in passes_unsupported(paths)
    with pytest.raises(UserError, match="2 GB"):
        optimize_graph(paths, tmp_path)
