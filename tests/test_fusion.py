"""Attention fusion (graph.fusion): every attention block of tiny timm, small Segmenter and the default DINOv2
recipe, baseline and patched, becomes one com.microsoft MultiHeadAttention that ONNX Runtime CPU runs to the
same outputs; the clustering layers stay as they were; a block that is not provably attention stays unfused
with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import hgdeploy_main
from onnx import TensorProto, helper, numpy_helper

from hgdeploy.core.contract import INPUT_NAME, check_model, is_layer_node, save_onnx
from hgdeploy.families.catalogue import get_family
from hgdeploy.graph.fp16 import to_fp16
from hgdeploy.graph.fusion import FUSED_OP, MS_DOMAIN, fuse_attention
from hgdeploy.graph.lint import DEFAULT_MAJOR, lint_model
from hgdeploy.patch.export import export_onnx

# Segmenter's recipe at its [ci] shape (128x128, 8x8 tokens -> 6x6 clusters) with the ViT-Ti backbone instead of
# ViT-L (the same Attention/Block code, 12 layers, 3 heads): 2 decoder layers of the mask transformer too.
SMALL_SEGMENTER = ["segmenter_vit_l16_ade20k", "--set", "model.arch=vit_tiny_patch16_384", "--set",
                   "model.input_size=128x128", "--set", "cluster.grid=6x6"]
# Attention blocks per graph: encoder depth (+ Segmenter's 2 mask-transformer decoder layers, attention too)
BLOCKS = {"timm": 4, "segmenter": 12 + 2, "dinov2": 12}
GRAPHS = ("baseline.onnx", "patched.onnx", "patched.opt.onnx")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_export, tiny_export) -> dict[str, Path]:
    """Export folders (graphs after the passes included) of tiny timm and the small Segmenter; DINOv2 is the
    session's small export of the default recipe, timm the session's tiny export."""
    folders = {"dinov2": small_export, "timm": tiny_export}
    for name, args in (("segmenter", SMALL_SEGMENTER),):
        out = tmp_path_factory.mktemp(f"fusion_{name}") / "out"
        done = hgdeploy_main("export", *args, "--engine", "ort-cuda-fp16", "--out", str(out))
        assert done.returncode == 0, done.stderr
        folders[name] = out
    return folders


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _input(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {INPUT_NAME: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _layer_nodes(model: onnx.ModelProto) -> list[tuple]:
    in_layer = is_layer_node(model)
    return sorted((n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node if in_layer(n))


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_every_attention_block_fuses_and_onnxruntime_computes_the_same(exports, family, graph, tmp_path):
    model = onnx.load(str(exports[family] / graph))
    fused, summary = fuse_attention(model)
    assert (summary.found, len(summary.fused), summary.not_fused) == (BLOCKS[family], BLOCKS[family], []), \
        summary.to_json()
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(FUSED_OP) == BLOCKS[family]
    assert all(n.domain == MS_DOMAIN for n in fused.graph.node if n.op_type == FUSED_OP)
    # the only Softmax left are the clustering layers' (soft k-means), which must stay as they were
    assert ops.count("Softmax") == summary.layer_softmax == (0 if graph == "baseline.onnx" else 6)
    assert _layer_nodes(fused) == _layer_nodes(model)
    check_model(save_onnx(fused, tmp_path / graph))  # checker, strict typed shape inference, static shapes
    feed = _input(model)
    for want, got in zip(_run(model, feed), _run(fused, feed), strict=True):
        assert _cosine(got, want) >= 0.99999
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_torchvision_nn_multihead_attention_fuses_too(tmp_path):
    """torchvision's ViT runs nn.MultiheadAttention: sequence first inside the block, a Gemm after the merge."""
    family = get_family("torchvision_vit")
    net, size = family.tiny()
    path = export_onnx(net, torch.zeros(1, 3, *size), tmp_path / "tv.onnx", family.output_names)
    model = onnx.load(str(path))
    fused, summary = fuse_attention(model)
    assert len(summary.fused) == summary.found == 4 and summary.not_fused == [], summary.to_json()
    feed = _input(model)
    for want, got in zip(_run(model, feed), _run(fused, feed), strict=True):
        assert _cosine(got, want) >= 0.99999


def test_the_fp16_converter_keeps_the_fused_attention_in_fp16(exports):
    model = onnx.load(str(exports["segmenter"] / "patched.opt.onnx"))
    fused, _ = fuse_attention(model)
    half, _ = to_fp16(fused, is_layer_node(fused))
    types = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.value_info, *half.graph.input]}
    attention = [n for n in half.graph.node if n.op_type == FUSED_OP]
    assert len(attention) == BLOCKS["segmenter"]
    assert {types[t] for n in attention for t in [*n.input, *n.output]} == {TensorProto.FLOAT16}
    assert _layer_nodes(half) == _layer_nodes(to_fp16(model, is_layer_node(model))[0])
    feed = _input(model)
    assert _cosine(_run(half, feed)[0], _run(model, feed)[0]) >= 0.999


def test_lint_names_each_fused_node_and_nothing_else(exports):
    """The fused graphs are for ONNX Runtime profiles: TensorRT's parser takes no com.microsoft op (TensorRT
    fuses MatMul-Softmax-MatMul itself), and `hgdeploy lint` says so, once per fused node."""
    model = onnx.load(str(exports["dinov2"] / "baseline.onnx"))
    assert lint_model(model, DEFAULT_MAJOR) == []
    findings = lint_model(fuse_attention(model)[0], DEFAULT_MAJOR)
    assert len(findings) == BLOCKS["dinov2"]
    assert all(f.op_type == FUSED_OP and "com.microsoft" in f.reason for f in findings)


# ------------------------------------------------------------------ a block built in code, and its near misses

B, S, H, D = 1, 6, 2, 4


def _attention_graph(scale: bool = True, mask: bool = False, head_scale: bool = False, swapped: bool = False,
                     axis: int = -1, seq_first: bool = False, batch: int = B) -> onnx.ModelProto:
    """One self-attention block as the dynamo exporter writes it (packed qkv, SDPA's split scale; seq_first:
    nn.MultiheadAttention's [S, B, C]); the other flags make it something MultiHeadAttention does not compute."""
    rng = np.random.default_rng(1)
    c = H * D
    lead = [S, batch] if seq_first else [batch, S]
    split = [*lead, 3, D, H] if swapped else [*lead, 3, H, D]  # swapped: head_dim before heads, not a head split
    inits = {"w": rng.standard_normal((c, 3 * c)), "b": rng.standard_normal(3 * c), "split": split,
             "merge": [S * batch, c] if seq_first else [batch, S, c],
             "s": (D ** -0.25) * np.ones([1, H, 1, 1] if head_scale else []),
             "i0": 0, "i1": 1, "i2": 2, "m": rng.standard_normal((1, 1, S, S))}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "split"], ["r"]),
             helper.make_node("Transpose", ["r"], ["p"], perm=[2, 1, 3, 0, 4] if seq_first else
                              [2, 0, 4, 1, 3] if swapped else [2, 0, 3, 1, 4])]
    nodes += [helper.make_node("Gather", ["p", f"i{i}"], [n], axis=0) for i, n in enumerate("qkv")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt0"], perm=[0, 1, 3, 2])]
    q, kt = ("q", "kt0")
    if scale:
        nodes += [helper.make_node("Mul", ["q", "s"], ["qs"]), helper.make_node("Mul", ["kt0", "s"], ["kts"])]
        q, kt = "qs", "kts"
    nodes += [helper.make_node("MatMul", [q, kt], ["scores"])]
    logits = "scores"
    if mask:
        nodes += [helper.make_node("Add", ["scores", "m"], ["masked"])]
        logits = "masked"
    nodes += [helper.make_node("Softmax", [logits], ["probs"], axis=axis),
              helper.make_node("MatMul", ["probs", "v"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[2, 0, 1, 3] if seq_first else [0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    for i, n in enumerate(nodes):
        n.name = f"n{i}_{n.op_type}"
    tensors = [numpy_helper.from_array(np.asarray(v, np.int64 if k in ("split", "merge", "i0", "i1", "i2")
                                                  else np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, inits["merge"])],
                              initializer=tensors)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("scale", [True, False])
def test_a_block_built_in_code_fuses_and_matches(scale):
    """The positive control of the near misses below; without any scale node the block is attention with
    scale 1, and that is what the fused node says."""
    model = _attention_graph(scale=scale)
    fused, summary = fuse_attention(model)
    assert len(summary.fused) == 1 and summary.not_fused == []
    (node,) = [n for n in fused.graph.node if n.op_type == FUSED_OP]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == H and attrs["scale"] == pytest.approx(D ** -0.5 if scale else 1.0)
    x = {"x": np.random.default_rng(2).standard_normal((B, S, H * D)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, x)[0], _run(model, x)[0], atol=1e-5)
    assert json.loads(json.dumps(summary.to_json()))["fused"] == 1


@pytest.mark.parametrize("batch", [1, 3])
def test_a_sequence_first_block_fuses_and_matches(batch):
    """nn.MultiheadAttention's layout (torchvision's ViT): [S, B, C] in, [S*B, C] out, around the fused node."""
    model = _attention_graph(seq_first=True, batch=batch)
    fused, summary = fuse_attention(model)
    assert len(summary.fused) == 1 and summary.not_fused == [], summary.to_json()
    x = {"x": np.random.default_rng(2).standard_normal((S, batch, H * D)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, x)[0], _run(model, x)[0], atol=1e-5)


@pytest.mark.parametrize(("change", "reason"), [
    ({"mask": True}, "scores come from Add (an additive mask"),
    ({"head_scale": True}, "not by a scalar constant"),
    ({"swapped": True}, "not a head split"),
    ({"axis": 2}, "axis 2"),
])
def test_a_block_that_is_not_multi_head_attention_stays_unfused_with_the_reason(change, reason):
    model = _attention_graph(**change)
    fused, summary = fuse_attention(model)
    assert summary.found == 1 and summary.fused == []
    assert len(summary.not_fused) == 1 and reason in summary.not_fused[0].reason, summary.to_json()
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
