"""Window token clustering and reconstruction (Swin, SAM): the plain layers run inside every window, windows
never mix, zero reduction is the identity (padding included) and the ONNX export is static."""

from __future__ import annotations

import onnx
import pytest
import torch

from hgdeploy.core.contract import static_shape_problems
from hgdeploy.layers import (
    TokenClustering,
    TokenReconstruction,
    WindowTokenClustering,
    WindowTokenReconstruction,
    dropped_clusters,
    kept_size,
    padded_size,
    window_merge,
    window_partition,
)


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
    # 13 x 11 pads to 18 x 12: 3 x 2 windows of 4 x 4 clusters; the clusters starting in the padding (rows 9..11,
    # cell 9 starts at token 9 * 6 / 4 = 13.5 > 13) are dropped, columns 0..7 all start inside.
    assert layer.grid_size == (12, 8) and layer.clustered_size == (9, 8) and clusters.shape == (2, 9, 8, 8)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 5))  # Swin pads right and bottom with zeros
    plain = TokenClustering((6, 6), (4, 4), 3, 3, 0.5, form)
    one = plain(padded[1:2, 6:12, 0:6].reshape(1, 36, 8))  # image 1, window row 1, column 0, by hand
    assert torch.allclose(clusters[1, 4:8, 0:4].reshape(1, 16, 8), one, atol=1e-5)
    moved = x.clone()
    moved[0, :6, :6] += 3.0  # change one window: no other window's clusters may move
    changed = (layer(moved)[0] - clusters).abs().amax(-1) > 1e-6
    assert changed[0, :4, :4].all() and changed.sum() == 16


def test_kept_clusters_are_those_whose_cell_starts_inside_the_map():
    assert kept_size((13, 11), 6, 4) == (9, 8)
    assert kept_size((40, 40), 12, 8) == (27, 27)  # Mask2Former Swin-L at 640: stage 3 is 40 x 40, window 12
    assert kept_size((40, 40), 12, 12) == (40, 40)  # zero reduction keeps the map itself
    dropped = dropped_clusters((13, 11), 6, 4)
    assert dropped.shape == (6, 16)
    # windows of the last row (4, 5) keep cluster row 8 (local row 0) and drop rows 9..11; the others drop none
    last = dropped[4:].view(2, 4, 4)
    assert not dropped[:4].any() and not last[:, 0].any() and last[:, 1:].all()


@pytest.mark.parametrize("form", ["dense", "local"])
def test_one_cluster_a_window_is_the_windows_mean(form):
    """cluster_window runs 1..window: k = 1 is one cluster a window, and k-means with one cluster is its tokens'
    mean (every token's only candidate; the M-step's weighted mean of all of them), whatever tau."""
    x = _map(H=12, W=18)
    clusters, _, s = WindowTokenClustering((12, 18), 6, 1, 3, 2, 0.5, form)(x)
    mean = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 6).permute(0, 2, 3, 1)  # [2, 2, 3, 8]
    assert clusters.shape == mean.shape and s.shape == (12, 1, 8)
    torch.testing.assert_close(clusters, mean, rtol=1e-5, atol=1e-5)
    for bad in (0, 7):
        with pytest.raises(ValueError, match="must be in 1..6"):
            WindowTokenClustering((12, 18), 6, bad, 3, 2, 0.5, form)


@pytest.mark.parametrize("candidates", ["nearest", "neighbourhood"])
def test_no_token_is_rebuilt_from_a_dropped_cluster(candidates):
    from hgdeploy.layers import neighbour_table

    layer = WindowTokenClustering((13, 11), 6, 4, 3, 3, 0.5, "local")
    cells = neighbour_table((6, 6), (4, 4), 3) if candidates == "neighbourhood" else None
    rebuild = WindowTokenReconstruction(layer, TokenReconstruction(16, 0.5, "softmax", cells))  # k: all clusters
    clusters, z, s = layer(_map())
    w, index = rebuild.inner.weights(z, s, rebuild.dropped.repeat(2, 1))
    index = index.expand_as(w) if index.dim() == 2 else index
    on_dropped = (rebuild.dropped.repeat(2, 1).gather(1, index.flatten(1)).view_as(w) > 0)
    inside = torch.zeros(1, 18, 12, 1, dtype=torch.bool)
    inside[:, :13, :11] = True
    real = window_partition(inside, 6).squeeze(-1).repeat(2, 1)  # [B * nW, 36]: the tokens that are cropped out
    assert (w * on_dropped)[real].sum() < 1e-6 and on_dropped[real].any()  # candidates there, but no weight
    base = rebuild(clusters, z, s)
    assert base.abs().max() < 1e3 and torch.isfinite(base).all()


@pytest.mark.parametrize("candidates", ["nearest", "neighbourhood"])
def test_zero_reduction_with_a_sharp_temperature_is_the_identity_padding_included(candidates):
    from hgdeploy.layers import neighbour_table

    x = _map()
    layer = WindowTokenClustering((13, 11), 6, 6, 3, 3, 1e-4, "local")
    cells = neighbour_table((6, 6), (6, 6), 3) if candidates == "neighbourhood" else None
    rebuild = WindowTokenReconstruction(layer, TokenReconstruction(4, 1e-4, "softmax", cells))
    clusters, z, s = layer(x)
    assert torch.allclose(rebuild(clusters, z, s), x, atol=1e-5)


@pytest.mark.parametrize("variant", ["softmax", "official"])
def test_the_window_layers_export_with_static_shapes(tmp_path, variant):
    """official: the authors' M-step and cells, and every weight >= the k-th over all the window's centres."""
    official = variant == "official"

    class Hourglass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cluster = WindowTokenClustering((13, 11), 6, 4, 3, 2, 0.5, "local", official=official)
            self.rebuild = WindowTokenReconstruction(self.cluster, TokenReconstruction(4, 0.5, variant))

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
