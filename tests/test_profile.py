"""`hgdeploy bench --profile`: ONNX Runtime's per-node trace summed by op type and by part of the model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import TINY_TIMM, hgdeploy_main
from onnx import TensorProto, helper

from hgdeploy.backends import end_profiling, load_profile, make_runner, require_profiler
from hgdeploy.core.contract import (FP32_MARKER, INPUT_NAME, NAME_SCOPES, node_scopes, read_clustering_specs,
                                    write_clustering_specs)
from hgdeploy.core.errors import UserError
from hgdeploy.measure.profile import PARTS, Layers, module_path, part_of, read_trace, summarise

QUICK = '[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n'
SPECS = [{"scope": "blocks.1.clustering", "kind": "clustering"},
         {"scope": "blocks.1.reconstruction", "kind": "reconstruction"}]
SCOPES = {"node_qkv": ["", "blocks", "blocks.0", "blocks.0.attn", "blocks.0.attn.qkv", "linear"],
          "node_fc1": ["", "blocks", "blocks.0", "blocks.0.mlp", "blocks.0.mlp.fc1", "linear_1"],
          "node_dist": ["", "blocks", "blocks.1", "blocks.1.clustering", "matmul_3"],
          "node_gather": ["", "blocks", "blocks.1", "blocks.1.reconstruction", "gather"],
          "node_norm": ["", "blocks", "blocks.0", "blocks.0.norm1", "layer_norm"]}


def event(name: str, ts: float, dur: float, op: str | None = None, cat: str = "Node") -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": {"op_name": op} if op else {}}


def run_events(start: float, scale: float) -> list[dict]:
    """One model_run as ORT traces it: fences around each kernel, fused and marked names, a kernel ORT made."""
    kernels = [("node_qkv/MatMulAddFusion", "Gemm", 100), ("node_fc1/MatMulScaleFusion//MatmulTransposeFusion/",
               "FusedMatMul", 200), (f"{FP32_MARKER}/node_dist", "MatMul", 40), ("node_gather", "GatherElements", 10),
               ("node_norm", "LayerNormalization", 5), ("gemm_input_reshape_token_7", "Reshape", 1)]
    out = [event("model_run", start, 1000, cat="Session")]
    for i, (name, op, dur) in enumerate(kernels):
        ts = start + 10 + 100 * i
        out += [event(f"{name}_fence_before", ts, 0, op), event(f"{name}_kernel_time", ts + 1, dur * scale, op),
                event(f"{name}_fence_after", ts + 2, 0, op)]
    return out


def test_a_trace_sums_the_kernels_median_by_part_and_by_op():
    """The warm-up run (10x slower) is left out; each kernel counts its median over the kept runs, once in its
    op type and once in its part; fences and the session events are not kernels."""
    trace = run_events(0, 10.0) + run_events(5000, 1.0) + run_events(10000, 1.0) + run_events(15000, 3.0)
    trace.append(event("session_initialization", 0, 99999, cat="Session"))
    got = summarise("patched.opt.onnx", trace, skip=1, layers=Layers.of(SCOPES, SPECS))
    assert got.runs == 3 and got.kernels == 6 and got.unscoped == 1 and got.unscoped_ms == 0.001 and got.run_ms == 1.0
    assert list(got.by_part) == list(PARTS)
    assert got.by_part == {"clustering": 0.04, "reconstruction": 0.01, "attention": 0.1, "mlp": 0.2,
                           "rest": pytest.approx(0.006)}
    assert got.by_op["FusedMatMul"] == 0.2 and list(got.by_op)[0] == "FusedMatMul"  # largest first
    assert sum(got.by_part.values()) == pytest.approx(sum(got.by_op.values())) == pytest.approx(got.total_ms)
    assert json.loads(json.dumps(got.to_json()))["kernels_ms"] == pytest.approx(0.356)


def test_a_fused_or_marked_node_finds_the_module_path_it_came_from():
    assert module_path("node_fc1/MatMulScaleFusion//MatmulTransposeFusion/", SCOPES) == SCOPES["node_fc1"]
    assert module_path(f"{FP32_MARKER}/node_dist", SCOPES) == SCOPES["node_dist"]
    assert module_path("node_qkv", SCOPES) == SCOPES["node_qkv"]
    assert module_path("node_qkv_2", SCOPES) is None and module_path("ReorderOutput", SCOPES) is None


@pytest.mark.parametrize("op, path, part", [
    ("MatMul", ["", "encoder.layer.0.attention.attention.query", "linear"], "attention"),  # HF DINOv2
    ("MatMul", ["", "encoder.layer.0.attention.output.dense", "linear"], "attention"),  # HF ViT / Swin
    ("MatMul", ["", "encoder.layer.0.intermediate.dense", "linear"], "mlp"),
    ("MatMul", ["", "encoder.layer.0.output.dense", "linear"], "mlp"),
    ("MatMul", ["", "encoder.layer.0.mlp.fc2", "linear"], "mlp"),  # DINOv2, timm, Segmenter, SAM
    ("MultiHeadAttention", None, "attention"),  # a fused attention node the passes made
    ("Conv", ["", "patch_embed.proj", "conv2d"], "rest"),
    ("Mul", ["", "blocks.1", "blocks.1.clustering", "mul"], "clustering"),
    ("Mul", ["", "win", "win.clustering", "mul"], "clustering"),
    ("Mul", ["", "win", "win.reconstruction", "mul"], "reconstruction"),
])
def test_each_part_is_told_by_op_type_or_module_path(op, path, part):
    layers = Layers.of({}, SPECS + [{"scope": "win.clustering", "kind": "window_clustering"},
                                    {"scope": "win.reconstruction", "kind": "window_reconstruction"}])
    assert part_of(op, path, layers) == part


def scoped_graph() -> onnx.ModelProto:
    """x -> MatMul (attention) -> Softmax (clustering) -> Sigmoid (MLP) -> Neg (no module path): a graph with the
    exporter's node metadata and the clustering specs, as an export writes them."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel().tolist())
    nodes = [helper.make_node("MatMul", [INPUT_NAME, "w"], ["a"], name="node_qkv"),
             helper.make_node("Softmax", ["a"], ["b"], name="node_dist", axis=-1),
             helper.make_node("Sigmoid", ["b"], ["c"], name="node_fc1"),
             helper.make_node("Neg", ["c"], ["y"], name="node_extra")]
    for node in nodes[:3]:
        node.metadata_props.add(key=NAME_SCOPES, value=repr(SCOPES[node.name]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    write_clustering_specs(model, SPECS)
    return model


def test_an_ort_session_with_profiling_traces_every_node(tmp_path):
    """make_runner(profiling=...) turns ORT's profiler on, end_profiling hands back its trace, and the trace's
    nodes land in their parts."""
    path = tmp_path / "g.onnx"
    onnx.save(scoped_graph(), str(path))
    (tmp_path / "quick.toml").write_text(QUICK)
    engine = load_profile(str(tmp_path / "quick.toml"))
    with make_runner(path, engine, profiling=tmp_path / "trace" / "g") as runner:
        for _ in range(4):
            runner.infer({INPUT_NAME: np.ones((1, 4, 8), np.float32)})
        trace = end_profiling(runner)
    assert trace.parent == tmp_path / "trace" and trace.name.startswith("g")
    model = onnx.load(str(path))
    got = summarise(path.name, read_trace(trace), 1, Layers.of(node_scopes(model), read_clustering_specs(model)))
    assert got.runs == 3 and got.kernels == 4 and got.unscoped == 1
    assert all(got.by_part[p] > 0 for p in ("attention", "clustering", "mlp", "rest"))
    assert got.by_part["reconstruction"] == 0
    assert set(got.by_op) == {"MatMul", "Softmax", "Sigmoid", "Neg"}


def test_profiling_needs_an_onnx_runtime_profile():
    with pytest.raises(UserError, match="--profile needs an ONNX Runtime profile"):
        require_profiler(load_profile("trt-fp16"))
    require_profiler(load_profile("ort-cpu"))


def test_bench_profile_writes_profile_json_for_both_graphs(tmp_path):
    """The tiny model end to end: profile.json beside the export holds both graphs, the clustering layers show in
    the patched one only, and the parts add up to the op types; --json carries the same summary."""
    out, quick = tmp_path / "out", tmp_path / "quick.toml"
    quick.write_text(QUICK)
    assert hgdeploy_main("export", *TINY_TIMM, "--out", str(out)).returncode == 0
    done = hgdeploy_main("bench", *TINY_TIMM, "--out", str(out), "--engine", str(quick), "--profile", "--json")
    assert done.returncode == 0, done.stderr
    written = json.loads((out / "profile.json").read_text())
    assert json.loads(done.stdout)["profile"] == written
    graphs = written["graphs"]
    assert set(graphs) == {"baseline", "patched"}
    for key, g in graphs.items():
        assert set(g["by_part"]) == set(PARTS) and g["runs"] == 10 and g["kernels_ms"] > 0
        assert sum(g["by_part"].values()) == pytest.approx(sum(g["by_op"].values()), rel=1e-9)
        assert g["by_part"]["attention"] > 0 and g["by_part"]["mlp"] > 0
        assert (g["by_part"]["clustering"] > 0) == (key == "patched"), key
    assert graphs["patched"]["by_part"]["reconstruction"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["baseline.fused.onnx", "baseline.onnx", "manifest.json",
                                                     "patched.fused.onnx", "patched.onnx", "patched.opt.onnx",
                                                     "profile.json"]


def test_bench_profile_prints_where_the_milliseconds_go(tmp_path):
    quick = tmp_path / "quick.toml"
    quick.write_text(QUICK)
    done = hgdeploy_main("bench", *TINY_TIMM, "--engine", str(quick), "--profile")
    assert done.returncode == 0, done.stderr
    assert "where the milliseconds go" in done.stdout and "by op type" in done.stdout
    for row in ("clustering", "reconstruction", "attention", "MLP", "kernels, total"):
        assert row in done.stdout, row
