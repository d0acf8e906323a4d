"""Export: static, checked ONNX that ONNX Runtime runs with parity to PyTorch."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hgdeploy.core.contract import INPUT_NAME, static_shape_problems
from hgdeploy.core.plan import ClusterPlan
from hgdeploy.families.dinov2 import patch_dinov2
from hgdeploy.layers import TokenClustering, TokenReconstruction, neighbour_table
from hgdeploy.measure.checks import cosine
from hgdeploy.patch.export import export_onnx


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


def _outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})


def test_graphs_over_2_gb_go_through_the_passes_and_fp16_with_external_weights(small_export, tmp_path, monkeypatch):
    """SAM ViT-H and SWAG ViT-H/14 keep their weights in patched.onnx.data (protobuf's 2 GB limit): the passes
    and the fp16 conversion read them, and write external weights again where their result is still too big.
    The limit is lowered here to make the default model's export "too big" without gigabytes of test data."""
    import hgdeploy.core.contract as contract
    from hgdeploy.core.files import file_mode
    from hgdeploy.graph.deploy import optimize_patched, write_twins
    from hgdeploy.graph.folder import ExportFolder

    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("baseline.onnx", "patched.onnx"):
        onnx.save_model(onnx.load(str(small_export / name)), str(folder / name), save_as_external_data=True,
                        location=name + ".data", size_threshold=1024)
    export = ExportFolder.scan(folder)
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112), dtype=np.float32)

    monkeypatch.setattr(contract, "INLINE_LIMIT_BYTES", 0)  # every graph "too big": all written with .data
    export, report = optimize_patched(export)
    assert not report.lint_findings and report.nodes_after < report.nodes_before
    write_twins(export, SimpleNamespace(name="fp16", precision="fp16", fused_attention=False))
    for name in ("patched.opt.onnx", "baseline.fp16.onnx", "patched.fp16.onnx"):
        data = folder / (name + ".data")
        assert data.stat().st_size > 10 * (folder / name).stat().st_size, name  # the weights are outside
        assert data.stat().st_mode & 0o777 == file_mode(), name  # as the user's umask says (onnx: 0600)
        for got, want in zip(_outputs(folder / name, x), _outputs(small_export / name, x), strict=True):
            np.testing.assert_array_equal(got, want)  # the same graph as the in-memory export's
    assert not list(folder.glob(".*staging*"))
    # the fused twins (ONNX Runtime profiles) leave the weights on disk too, cutting projections from the file
    fused, _ = write_twins(export, SimpleNamespace(name="ort", precision="fp32", fused_attention=True))
    for role in ("baseline", "patched"):
        path = fused.graphs[f"{role}_fused"]
        assert path.with_name(path.name + ".data").stat().st_size > 10 * path.stat().st_size, path
        source = "patched.opt.onnx" if role == "patched" else "baseline.onnx"
        for got, want in zip(_outputs(path, x), _outputs(small_export / source, x), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    monkeypatch.undo()  # the export small and inline again: so is the passes' result, and the earlier .data goes
    onnx.save_model(onnx.load(str(small_export / "patched.onnx")), str(folder / "patched.onnx"))
    (folder / "patched.onnx.data").unlink()
    optimize_patched(export)
    assert not (folder / "patched.opt.onnx.data").exists()
    for got, want in zip(_outputs(folder / "patched.opt.onnx", x), _outputs(small_export / "patched.opt.onnx", x),
                         strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_passes_leave_external_weights_on_disk_and_copy_them_file_to_file(tmp_path, monkeypatch):
    """A graph whose weights are in a .data file is optimized without loading them: a pass that needs a value
    reads it from the graph's folder (whatever the working directory), and the result's weights are copied
    into a .data file of its own, each tensor page-aligned, bit for bit."""
    from onnx import numpy_helper

    from hgdeploy.core.contract import EXTERNAL_ALIGN, save_onnx
    from hgdeploy.graph.passes import import_graph, optimize

    w = np.random.default_rng(1).standard_normal((3, 5000), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5000])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w[:, :300].copy(), "w2")])
    source = tmp_path / "src" / "g.onnx"
    source.parent.mkdir()
    onnx.save_model(helper.make_model(graph), str(source), save_as_external_data=True, location="g.onnx.data",
                    size_threshold=0)
    monkeypatch.chdir(tmp_path)  # not the graph's folder
    model = onnx.load(str(source), load_external_data=False)
    assert not model.graph.initializer[0].raw_data
    values = import_graph(model, source.parent).tensors()["w"].values
    np.testing.assert_array_equal(values, w)

    out, _ = optimize(onnx.load(str(source), load_external_data=False), weights_dir=source.parent)
    target = save_onnx(out, tmp_path / "dst" / "g.opt.onnx", weights_dir=source.parent)
    data = target.with_name("g.opt.onnx.data")
    offsets = [int(e.value) for t in onnx.load(str(target), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert data.exists() and offsets and all(o % EXTERNAL_ALIGN == 0 for o in offsets)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(target)).graph.initializer}
    np.testing.assert_array_equal(loaded["w"], w)
    x = np.ones((2, 3), np.float32)
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(x @ w, 0), rtol=1e-5)


def test_tensor_bytes_counts_initializers_constants_and_subgraphs():
    """What save_onnx weighs against protobuf's 2 GB: every tensor, wherever the graph keeps it."""
    from onnx import numpy_helper

    from hgdeploy.core.contract import tensor_bytes

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    branch = helper.make_graph([const("b", np.zeros((5, 3), np.float16))], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT16, [5, 3])])
    nodes = [const("c", np.zeros((2, 3), np.float32)),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [5, 3])],
                              [numpy_helper.from_array(np.zeros((4, 4), np.int64), "w")])
    assert tensor_bytes(helper.make_model(graph)) == 4 * 4 * 8 + 2 * 3 * 4 + 2 * (5 * 3 * 2)
