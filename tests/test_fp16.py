"""fp16 graphs with fp32 islands: a tiny graph built in code, and the real export an fp16 profile writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SMALL_EXPORT, hgdeploy_main
from onnx import TensorProto, helper, numpy_helper

from hgdeploy.core.contract import INPUT_NAME, is_fp32_layer_node, is_layer_node, read_clustering_specs
from hgdeploy.graph.fp16 import FP32_OPS, to_fp16
from hgdeploy.graph.lint import lint_model
from hgdeploy.measure.checks import cosine

REPO = Path(__file__).resolve().parents[1]
KEEP = "keep_fp32/"


def _tiny() -> onnx.ModelProto:
    """Conv -> Resize -> flatten -> MatMul -> LayerNorm -> Softmax (marked fp32) -> MatMul, with a Cast to float."""
    rng = np.random.default_rng(0)
    inits = {
        "w_conv": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "b_conv": np.zeros(4, np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32), "shape": np.array([1, 4, 256], np.int64),
        "w_mm": rng.standard_normal((256, 16)).astype(np.float32), "ln_s": np.ones(16, np.float32),
        "ln_b": np.zeros(16, np.float32), "w_out": rng.standard_normal((16, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="linear", name="resize"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w_mm"], ["h"], name="proj"),
        helper.make_node("LayerNormalization", ["h", "ln_s", "ln_b"], ["n"], axis=-1, name="norm"),
        helper.make_node("Softmax", ["n"], ["p"], axis=-1, name=f"{KEEP}softmax"),
        helper.make_node("Cast", ["p"], ["pc"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["pc", "w_out"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    out |= {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    return out


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_tiny_graph_types_casts_and_values():
    model = _tiny()
    fp16, summary = to_fp16(model, lambda n: n.name.startswith(KEEP))
    types = _types(fp16)
    nodes = {n.name: n for n in fp16.graph.node}
    assert types["x"] == TensorProto.FLOAT and types["y"] == TensorProto.FLOAT  # the graph's own I/O stays fp32
    assert types[nodes["conv"].input[1]] == TensorProto.FLOAT16 and types[nodes["proj"].input[1]] == TensorProto.FLOAT16
    assert types[nodes["resize"].input[2]] == TensorProto.FLOAT  # Resize's scales are tensor(float) by the spec
    for kept in ("norm", f"{KEEP}softmax"):  # LayerNorm (FP32_OPS) and the marked node compute in fp32
        assert all(types[i] == TensorProto.FLOAT for i in nodes[kept].input if i), kept
        assert all(types[o] == TensorProto.FLOAT for o in nodes[kept].output), kept
    assert "LayerNormalization" in FP32_OPS and nodes["cast"].attribute[0].i == TensorProto.FLOAT16
    assert summary.casts >= 4 and summary.fp16_weight_share > 0.9
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got, want = _run(fp16, {"x": x})[0], _run(model, {"x": x})[0]
    assert got.dtype == np.float32 and cosine(got, want) > 0.999 and np.abs(got - want).max() < 0.05


def test_without_islands_everything_but_io_is_fp16():
    fp16, summary = to_fp16(_tiny(), lambda n: False)
    types = _types(fp16)
    softmax = next(n for n in fp16.graph.node if n.op_type == "Softmax")
    assert types[softmax.input[0]] == TensorProto.FLOAT16 and summary.fp32_nodes == 1  # LayerNorm alone


def test_a_float32_minimum_mask_fill_stays_finite_in_fp16():
    """torch writes masked attention as Where(mask, x, -3.4e38); cast blindly, that is -inf in fp16 and a
    fully masked row's softmax is NaN. The converter clips finite constants to fp16's range instead."""
    fill = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fill")
    nodes = [helper.make_node("Where", ["m", "x", "fill"], ["w"], name="mask"),
             helper.make_node("Softmax", ["w"], ["y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 3]),
                                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [fill])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    with np.errstate(over="raise"):
        fp16, _ = to_fp16(model, lambda n: False)
    half = next(numpy_helper.to_array(t) for t in fp16.graph.initializer if t.name.startswith("fill"))
    assert half.dtype == np.float16 and half == -np.finfo(np.float16).max
    mask = np.array([[True, True, False], [False, False, False]])
    y = _run(fp16, {"m": mask, "x": np.zeros((2, 3), np.float32)})[0]
    assert np.isfinite(y).all() and np.allclose(y[1], 1 / 3, atol=1e-3)  # the fully masked row: uniform, not NaN


def test_a_normalising_eps_does_not_flush_to_zero_in_fp16():
    """F.normalize is x / max(|x|, 1e-12): in fp16 the eps would flush to 0 and a zero vector (SwinV2's key of a
    zero-padded token) give 0 / 0 = NaN. The converter keeps tiny constants at fp16's smallest subnormal."""
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["n"], keepdims=1, name="norm"),
             helper.make_node("Clip", ["n", "eps"], ["d"], name="floor"),  # torch exports clamp_min as Clip
             helper.make_node("Div", ["x", "d"], ["y"], name="normalise")]
    graph = helper.make_graph(nodes, "normalize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [eps, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    fp16, _ = to_fp16(model, lambda n: False)
    x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    y = _run(fp16, {"x": x})[0]
    assert np.isfinite(y).all() and np.allclose(y, [[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]], atol=1e-3)


hgdeploy = hgdeploy_main  # in this process: these commands need no process of their own


@pytest.fixture(scope="module")
def fp16_export(small_export) -> Path:
    """`hgdeploy export --engine trt-fp16` on this machine (the profile need not run here): conftest's export, with
    the plain fp16 twins every fp16 profile without fused_attention runs."""
    report = json.loads((small_export.parent / "export.json").read_text())
    assert report["engine"] == {"profile": "trt-fp16", "device": "gpu", "precision": "fp16"}
    assert report["plan"]["clustering_form"] == "dense"  # "auto" for a GPU
    assert {"baseline_fp16", "patched_fp16"} <= set(report["onnx"])
    return small_export


def test_the_fp16_export_is_fp16_with_fp32_clustering_distances(fp16_export):
    """Every clustering/reconstruction node computes in fp32 except the layers' weighted sums of tokens (their
    MatMuls, and the Transpose feeding one), which run in fp16 (layers.mixing)."""
    model = onnx.load(str(fp16_export / "patched.fp16.onnx"))
    sizes = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2}
    nbytes = {t: 0 for t in sizes}
    for init in model.graph.initializer:
        if init.data_type in sizes:
            nbytes[init.data_type] += sizes[init.data_type] * int(np.prod(init.dims))
    assert nbytes[TensorProto.FLOAT16] / sum(nbytes.values()) >= 0.9
    types, in_layer, fp32 = _types(model), is_layer_node(model), is_fp32_layer_node(model)
    layer_nodes = [n for n in model.graph.node if in_layer(n)]
    assert len(layer_nodes) > 50
    half = [n for n in layer_nodes if not fp32(n)]
    assert {n.op_type for n in half} == {"MatMul", "Transpose"}
    iters = next(s["iters"] for s in read_clustering_specs(model) if s["kind"] == "clustering")
    assert sum(n.op_type == "MatMul" for n in half) == 1 + iters + 1  # pooling, each M-step, reconstruction
    assert {n.op_type for n in layer_nodes if fp32(n)} >= {"MatMul", "Softmax", "Where", "ReduceSum"}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    for node in layer_nodes:
        want = TensorProto.FLOAT if fp32(node) else TensorProto.FLOAT16
        for name in [*node.input, *node.output]:
            if name and types.get(name) in floats:
                assert types[name] == want, (node.name, name)
    assert lint_model(model) == []


def test_the_fp16_export_runs_on_onnxruntime_cpu_close_to_fp32(fp16_export):
    from hgdeploy.core.preprocess import Preprocess
    from hgdeploy.measure.images import sample_photos, to_batch

    x = to_batch(sample_photos()[:1], Preprocess((112, 112))).numpy()
    fp32 = ort.InferenceSession(str(fp16_export / "patched.opt.onnx"), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(fp16_export / "patched.fp16.onnx"), providers=["CPUExecutionProvider"])
    for got, want in zip(fp16.run(None, {INPUT_NAME: x}), fp32.run(None, {INPUT_NAME: x}), strict=True):
        assert got.dtype == np.float32 and cosine(got, want) >= 0.999
    base = ort.InferenceSession(str(fp16_export / "baseline.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert all(np.isfinite(o).all() for o in base.run(None, {INPUT_NAME: x}))


def test_checking_a_gpu_export_on_the_cpu_patches_the_reference_like_the_graphs(fp16_export):
    """The export was planned for a GPU (dense clustering); `check --engine ort-cpu-fp16` runs its fp16 graph
    here and reports the plan the graphs have, not the one a CPU export would have."""
    result = hgdeploy("check", *[a for s in SMALL_EXPORT for a in ("--set", s)], "--engine", "ort-cpu-fp16",
                      "--out", str(fp16_export), "--json")
    assert result.returncode == 0, result.stderr
    assert "was planned for the gpu" in result.stderr
    report = json.loads(result.stdout)
    assert report["plan"]["device"] == "gpu" and report["plan"]["clustering_form"] == "dense"
    assert report["parity"]["engine_model"] == "patched.fp16.onnx" and report["parity"]["passed"]


@pytest.mark.parametrize("command", ["bench", "check", "build", "run"])
def test_a_gpu_profile_says_in_one_line_that_there_is_no_gpu(fp16_export, command):
    from hgdeploy.backends import availability, load_profile

    reason = availability(load_profile("ort-cuda"))
    if reason is None:
        pytest.skip("this machine can run ort-cuda")
    before = sorted(p.name for p in fp16_export.iterdir())
    result = hgdeploy(command, *[a for s in SMALL_EXPORT for a in ("--set", s)], "--engine", "ort-cuda", "--out",
                      str(fp16_export))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "cannot run here" in lines[0], result.stderr
    assert sorted(p.name for p in fp16_export.iterdir()) == before


# ---------------------------------------------------------------------------------------------- fused twins


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory, small_export) -> tuple[Path, dict]:
    """The fused twins ONNX Runtime's GPU profile (ort-cuda-fp16) runs, and what the export reports of them: made
    from conftest's export for the GPU (the same plan, the same fp32 graphs) by the function the export road calls
    for them (graph.deploy.write_twins), in a folder of their own without the plain fp16 twins. The road itself with
    a fused fp16 profile is run by test_gpu_report.py's smoke run."""
    from hgdeploy.backends import load_profile
    from hgdeploy.graph.deploy import write_twins
    from hgdeploy.graph.folder import ExportFolder
    from hgdeploy.measure.results import Report

    out = tmp_path_factory.mktemp("fused") / "out"
    out.mkdir()
    for name in ("baseline.onnx", "patched.onnx", "patched.opt.onnx"):
        shutil.copy2(small_export / name, out / name)
    folder, twins = write_twins(ExportFolder.scan(out), load_profile("ort-cuda-fp16"))
    folder.write_manifest()
    return out, Report(fusion=twins.fusion, fp16=twins.fp16).to_json()


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_the_gpu_export_fuses_every_attention_block_and_keeps_layernorm_out_of_cast_islands(fused_export):
    out, report = fused_export
    depth = 12  # DINOv2-S
    assert {twin: (f["found"], f["fused"], f["not_fused"]) for twin, f in report["fusion"].items()} == \
        {"baseline_fused": (depth, depth, []), "patched_fused": (depth, depth, [])}
    for name in ("baseline.fused.fp16.onnx", "patched.fused.fp16.onnx"):
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MultiHeadAttention") == depth, name
        made_by = _producers(model)
        fed_by_cast = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"
                       and getattr(made_by.get(n.input[0]), "op_type", None) == "Cast"]
        assert fed_by_cast == [], name
        assert all(a.i == 1 for n in model.graph.node if n.op_type == "LayerNormalization"
                   for a in n.attribute if a.name == "stash_type")  # fp32 statistics inside the op
    baseline = onnx.load(str(out / "baseline.fused.fp16.onnx"), load_external_data=False)
    assert [n.op_type for n in baseline.graph.node].count("Cast") <= 10  # the input's and the outputs', no islands
    assert all(report["fp16"][t]["lint_clean"] and report["fp16"][t]["linted_for"] == "onnxruntime"
               for t in ("baseline_fused_fp16", "patched_fused_fp16"))


def test_the_fused_fp16_graphs_keep_parity_on_onnxruntime_cpu(fused_export, tmp_path):
    """ONNX Runtime's CPU provider has fp16 kernels for MultiHeadAttention and LayerNormalization: the fused
    graphs a GPU runs are checked against PyTorch here, with a CPU profile that runs them."""
    out, _ = fused_export
    profile = tmp_path / "ort-cpu-fp16-fused.toml"
    text = (REPO / "engines/ort-cpu-fp16.toml").read_text()
    profile.write_text(text.replace("[engine]\n", "[engine]\nfused_attention = true\n", 1))
    result = hgdeploy("check", *[a for s in SMALL_EXPORT for a in ("--set", s)], "--engine", str(profile),
                      "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    parity = json.loads(result.stdout)["parity"]
    assert parity["engine_model"] == "patched.fused.fp16.onnx" and parity["passed"] and parity["cosine_min"] >= 0.999


def test_tensorrt_profiles_never_read_the_fused_graphs(fused_export):
    from hgdeploy.backends import load_profile
    from hgdeploy.core.errors import UserError
    from hgdeploy.graph.folder import ExportFolder
    from hgdeploy.graph.lint import lint_path

    out, _ = fused_export
    folder = ExportFolder.scan(out)
    assert folder.patched_graph(load_profile("ort-cuda-fp16")).name == "patched.fused.fp16.onnx"
    with pytest.raises(UserError, match="hgdeploy export --engine trt-fp16"):
        folder.patched_graph(load_profile("trt-fp16"))  # an ORT export holds no plain fp16 twins: said
    assert any("com.microsoft" in f.reason for f in lint_path(out / "patched.fused.fp16.onnx"))  # why not


def test_the_onnxruntime_lint_names_an_op_onnxruntime_does_not_know():
    from hgdeploy.graph.lint import lint_runtime_model

    model = _tiny()
    assert lint_runtime_model(model) == []
    node = helper.make_node("NoSuchAttention", ["x"], ["y"], domain="com.microsoft", name="made_up")
    model.graph.node.append(node)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    found = lint_runtime_model(model)
    assert [(f.node, f.op_type) for f in found] == [("made_up", "NoSuchAttention")]
    assert "has no op com.microsoft::NoSuchAttention" in found[0].reason


def _smooth_tokens(grid: int, channels: int, norm: float, seed: int = 0) -> torch.Tensor:
    """[1, grid^2, C] tokens that vary smoothly over the grid (neighbours alike, as in a ViT), of about `norm`."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, grid // 4, grid // 4, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(grid, grid), mode="bicubic", align_corners=False)
    field = field + 0.3 * torch.randn(1, channels, grid, grid, generator=g)
    z = field.flatten(2).transpose(1, 2)
    return z / z.norm(dim=-1, keepdim=True).mean() * norm


def _as_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def test_clustering_precision_split():
    """The split layers.mixing states, on tokens like a ViT-B's (norms ~30) at the temperature tau = "auto" picks:
    running the
    layers' weighted sums in fp16 (operands and result rounded, fp32 accumulation) moves the centres less than a
    1e-3 relative noise on the tokens does; the E-step's distance GEMM in fp16 moves them far more, so it stays
    fp32. What makes the sums safe: each centre's weights reach the GEMM normalised (they sum to 1), so a nearly
    empty cluster's weights do not sink below fp16's normal range (6e-5) as its raw soft assignments do."""
    from hgdeploy.layers import TokenClustering, calibrate_tau
    from hgdeploy.layers.mixing import WeightedSum

    z = _as_fp16(_smooth_tokens(24, 96, norm=30.0))  # tokens reach the layer in fp16
    tau = calibrate_tau(TokenClustering((24, 24), (16, 16), neighbours=5, iters=5, tau=1.0, form="dense"), z)
    layer = TokenClustering((24, 24), (16, 16), neighbours=5, iters=5, tau=tau, form="dense")
    worst = lambda s: 1 - torch.nn.functional.cosine_similarity(s, ref, dim=-1).min().item()  # noqa: E731
    with torch.no_grad():
        ref = layer(z)
        noise = worst(layer(z * (1 + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1)))))
        hooks = [m.register_forward_pre_hook(lambda m, args: tuple(_as_fp16(a) for a in args))
                 for m in layer.modules() if isinstance(m, WeightedSum)]
        hooks += [m.register_forward_hook(lambda m, args, out: _as_fp16(out))
                  for m in layer.modules() if isinstance(m, WeightedSum)]
        sums_fp16 = worst(layer(z))
        for h in hooks:
            h.remove()
        matmul = torch.matmul  # the dense E-step's only torch.matmul: z @ (2 s / tau)^T
        try:
            torch.matmul = lambda a, b: _as_fp16(matmul(_as_fp16(a), _as_fp16(b)))
            distances_fp16 = worst(layer(z))
        finally:
            torch.matmul = matmul
    assert len(hooks) == 4  # fp16_pool and fp16_mix, a pre-hook and a hook each
    assert sums_fp16 < noise, (sums_fp16, noise)
    weights = []
    layer.fp16_mix.register_forward_pre_hook(lambda m, args: weights.append(args[0]))
    with torch.no_grad():
        layer(z)
    assert len(weights) == layer.iters
    for w in weights:  # [B, N, M], summed over the tokens of each centre
        assert torch.allclose(w.sum(1), torch.ones(()), atol=1e-4)
    assert distances_fp16 > 10 * noise, (distances_fp16, noise)
