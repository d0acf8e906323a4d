"""The windowed families (mask2former, swinv2, sam) beyond the generic family tests: zero reduction reproduces
each model to 1e-5 relative on maps of partial windows (the tiny models pad every clustered stage), the tiny
exports keep ONNX Runtime parity and lint clean (the recipes' CI exports check only the patched graph: their
unpatched graphs are transformers' own, checked here), and impossible plans are one-line errors (the Mask2Former
backbone's published FLOPs: tests/test_published_flops.py)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, default_reconstruct_after
from hgdeploy.families.catalogue import get_family
from hgdeploy.graph.lint import format_finding, lint_model, lint_path
from hgdeploy.measure.checks import cosine
from hgdeploy.patch.export import export_onnx

WINDOWED = ("mask2former", "swinv2", "sam")


def _plan(family, model, alpha: int, cluster_window: int | None = None, **options) -> ClusterPlan:
    facts = family.facts(model)
    K = facts.token_grid[0]
    k = K if cluster_window is None else cluster_window
    return ClusterPlan(token_grid=facts.token_grid, grid=(k, k), alpha=alpha, depth=facts.depth,
                       reconstruct_after=default_reconstruct_after(facts.reads, alpha, facts.depth), **options)


def _run(model, x):
    with torch.no_grad():
        return list(model(x))


@pytest.mark.parametrize("alpha", [1, 3])
@pytest.mark.parametrize("name", WINDOWED)
def test_zero_reduction_reproduces_the_model_to_1e_5(name: str, alpha: int):
    """alpha 1 clusters stage 1 (Swin: 16 x 16 in windows of 5, padded to 20), alpha 3 stage 2 (8 x 8, padded to
    10); SAM: layers 1.. or 3.. of a 16 x 16 map in windows of 6 (padded to 18), across its global layer."""
    family = get_family(name)
    model, size = family.tiny()
    torch.manual_seed(0)
    x = torch.randn(1, 3, *size)
    patched = family.patch(copy.deepcopy(model), _plan(family, model, alpha, tau=1e-4, k=1)).eval()
    for got, want in zip(_run(patched, x), _run(model, x), strict=True):
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


# The plans the tiny exports are made with: the fp16 test below reads SwinV2's with the nearest reconstruction and
# SAM's with the neighbourhood one from the same exports.
CANDIDATES = {"mask2former": {}, "swinv2": {"neighbours": 3, "reconstruct_from": "nearest"},
              "sam": {"neighbours": 3, "reconstruct_from": "neighbourhood"}}


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """name -> (family, model, patched model, input, patched.onnx): each family's tiny model clustered in stage 1
    (alpha 1, window K - 2), exported once for the tests of this file."""
    made = {}

    def get(name: str):
        if name not in made:
            family = get_family(name)
            model, size = family.tiny()
            torch.manual_seed(0)
            x = torch.randn(1, 3, *size)
            K = family.facts(model).token_grid[0]
            plan = _plan(family, model, 1, K - 2, tau=1.0, k=4, **CANDIDATES[name])
            patched = family.patch(copy.deepcopy(model), plan).eval()
            path = export_onnx(patched, x, tmp_path_factory.mktemp(name) / "patched.onnx", family.output_names)
            made[name] = family, model, patched, x, path
        return made[name]

    return get


@pytest.mark.parametrize("name", WINDOWED)
def test_tiny_exports_keep_onnxruntime_parity_and_lint_clean(name: str, tmp_path, tiny_exports):
    family, model, patched, x, patched_path = tiny_exports(name)
    assert any(float((a - b).abs().max()) > 1e-4 for a, b in zip(_run(patched, x), _run(model, x)))  # it clusters
    for key, m in (("baseline", model), ("patched", patched)):
        path = patched_path if key == "patched" else export_onnx(m, x, tmp_path / f"{key}.onnx", family.output_names)
        assert [format_finding(f) for f in lint_path(path)] == []
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(list(family.output_names), {INPUT_NAME: x.numpy()})
        for name_, g, w in zip(family.output_names, got, _run(m, x), strict=True):
            assert g.shape == tuple(w.shape) and np.isfinite(g).all()
            assert cosine(g, w.numpy()) >= 0.9999, f"{name} {key} {name_}"


@pytest.mark.parametrize("name", ["mask2former", "swinv2"])
def test_impossible_window_plans_are_one_line_errors(name: str):
    family = get_family(name)
    model, _ = family.tiny()
    facts = family.facts(model)
    K = facts.token_grid[0]
    across = ClusterPlan(token_grid=(K, K), grid=(K - 1, K - 1), alpha=1, reconstruct_after=3, depth=facts.depth, k=1)
    oblong = ClusterPlan(token_grid=(K, K), grid=(K - 1, K - 2), alpha=1, reconstruct_after=2, depth=facts.depth, k=1)
    small = ClusterPlan(token_grid=(K, K), grid=(K - 1, K - 1), alpha=5, reconstruct_after=6, depth=facts.depth, k=1)
    for plan, words in ((across, "patch merging"), (oblong, "must be square"), (small, "nothing to cluster")):
        with pytest.raises(UserError, match=words) as err:
            family.patch(copy.deepcopy(model), plan)
        assert "\n" not in str(err.value)


def test_sam_weights_run_at_their_own_size(tmp_path):
    family = get_family("sam")
    model, size = family.tiny()
    folder = family.write_checkpoint(model, tmp_path / "sam")
    with pytest.raises(UserError, match="run at 64x64"):
        family.load(str(folder), (128, 128), {})


@pytest.mark.parametrize("name", ["swinv2", "sam"])  # their candidates: CANDIDATES (nearest, neighbourhood)
def test_fp16_graphs_run_the_window_layers_in_fp32_but_their_weighted_sums_and_stay_finite(name: str, tiny_exports):
    """The deployed (plain, TensorRT's) fp16 graph, converted as graph.deploy converts it: the passes rewrite every
    masking penalty (the dropped clusters' included); every node of the window layers (partition, padding, crop and
    the plain layers inside) computes in fp32 except the layers' weighted sums of tokens (hgdeploy_fp16), which
    compute in fp16, as in the plain layers (tests/test_fp16.py); the outputs are finite and close to PyTorch's.
    SwinV2's cosine attention over zero-padded keys needs its normalising eps kept above zero (fp16.to_half)."""
    import onnx

    from hgdeploy.core.contract import is_fp32_layer_node, is_layer_node, read_clustering_specs
    from hgdeploy.graph.fp16 import FP32_OPS, to_fp16
    from hgdeploy.graph.passes import optimize

    family, _, patched, x, path = tiny_exports(name)
    optimized, notes = optimize(onnx.load(str(path)))
    kinds = {s["kind"] for s in read_clustering_specs(optimized)}
    assert {"window_clustering", "window_reconstruction", "clustering", "reconstruction"} <= kinds
    half, _ = to_fp16(optimized, is_fp32_layer_node(optimized), FP32_OPS)
    assert [format_finding(f) for f in lint_model(half)] == []
    # the types: every node of the layers computes in fp32 but their weighted sums of tokens (hgdeploy_fp16, the
    # MatMuls and a Transpose feeding one), which compute in fp16; the window ops (padding, crop) are among the fp32 ones
    inferred = onnx.shape_inference.infer_shapes(half).graph
    types = {t.name: t.data_type for t in inferred.initializer}
    types |= {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.output, *inferred.value_info]}
    in_layer, fp32 = is_layer_node(half), is_fp32_layer_node(half)
    layer_nodes = [n for n in half.graph.node if in_layer(n)]
    assert {n.op_type for n in layer_nodes if not fp32(n)} <= {"MatMul", "Transpose"}
    assert sum(n.op_type == "MatMul" and not fp32(n) for n in layer_nodes) >= 3  # pooling, an M-step, the mix
    assert {"Softmax", "Pad", "Slice"} <= {n.op_type for n in layer_nodes if fp32(n)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    typed = 0
    for node in layer_nodes:
        want = onnx.TensorProto.FLOAT if fp32(node) else onnx.TensorProto.FLOAT16
        for tensor in [*node.input, *node.output]:
            if tensor and types.get(tensor) in floats:
                assert types[tensor] == want, (node.op_type, node.name, tensor)
                typed += 1
    assert typed > 2 * len(layer_nodes) // 3
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(list(family.output_names), {INPUT_NAME: x.numpy()})
    for g, w in zip(got, _run(patched, x), strict=True):
        assert np.isfinite(g).all() and cosine(g, w.numpy()) >= 0.999
