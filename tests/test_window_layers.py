"""Window token clustering and reconstruction (Swin, SAM): the plain layers run inside every window, windows
never mix, zero reduction is the identity (padding included) and the ONNX export is static."""

from __future__ import annotations

import onnx
import pytest
import torch

from hgdeploy.contract import static_shape_problems
from hgdeploy.layers import (TokenClustering, TokenReconstruction, WindowTokenClustering, WindowTokenReconstruction,
                             padded_size, window_merge, window_partition)


def _map(B=2, H=13, W=11, C=8, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, H, W, C)


def test_partition_and_merge_are_inverse_and_windows_are_contiguous_patches():
    x = _map(H=12, W=18)
    w = window_partition(x, 6)
    assert w.shape == (2 * 2 * 3, 36, 8)
    assert torch.equal(w[4].reshape(6, 6, 8), x[0, 6:12, 6:12])  # image 0, window row 1, column 1
    assert torch.equal(window_merge(w, 6, (12, 18)), x)
    assert padded_size((13, 11), 6) == (18, 12)


@pytest.mark.parametrize("form", ["dense", "local"])
def test_each_window_is_clustered_on_its_own_as_the_plain_layer_would(form):
    x = _map()
    layer = WindowTokenClustering((13, 11), 6, 4, 3, 3, 0.5, form)
    clusters, z, s = layer(x)
    assert clusters.shape == (2, 12, 8, 8) and layer.clustered_size == (12, 8)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 5))  # Swin pads right and bottom with zeros
    plain = TokenClustering((6, 6), (4, 4), 3, 3, 0.5, form)
    one = plain(padded[1:2, 6:12, 0:6].reshape(1, 36, 8))  # image 1, window row 1, column 0, by hand
    assert torch.allclose(clusters[1, 4:8, 0:4].reshape(1, 16, 8), one, atol=1e-5)
    moved = x.clone()
    moved[0, :6, :6] += 3.0  # change one window: no other window's clusters may move
    changed = (layer(moved)[0] - clusters).abs().amax(-1) > 1e-6
    assert changed[0, :4, :4].all() and changed.sum() == 16


@pytest.mark.parametrize("candidates", ["nearest", "neighbourhood"])
def test_zero_reduction_with_a_sharp_temperature_is_the_identity_padding_included(candidates):
    from hgdeploy.layers import neighbour_table

    x = _map()
    layer = WindowTokenClustering((13, 11), 6, 6, 3, 3, 1e-4, "local")
    cells = neighbour_table((6, 6), (6, 6), 3) if candidates == "neighbourhood" else None
    rebuild = WindowTokenReconstruction(layer, TokenReconstruction(4, 1e-4, "softmax", cells))
    clusters, z, s = layer(x)
    assert torch.allclose(rebuild(clusters, z, s), x, atol=1e-5)


def test_the_window_layers_export_with_static_shapes(tmp_path):
    class Hourglass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cluster = WindowTokenClustering((13, 11), 6, 4, 3, 2, 0.5, "local")
            self.rebuild = WindowTokenReconstruction(self.cluster, TokenReconstruction(4, 0.5))

        def forward(self, x):
            clusters, z, s = self.cluster(x)
            return self.rebuild(clusters * 2.0, z, s)

    model = Hourglass().eval()
    path = tmp_path / "windows.onnx"
    torch.onnx.export(model, (_map(B=1),), str(path), dynamo=True, opset_version=18)
    graph = onnx.load(str(path))
    assert not static_shape_problems(onnx.shape_inference.infer_shapes(graph))
    import onnxruntime as ort

    x = _map(B=1, seed=1)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {graph.graph.input[0].name:
                                                                                         x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)
