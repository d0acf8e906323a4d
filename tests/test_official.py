"""`reconstruction = "official"`: the layers a plan builds follow the authors' clustering and reconstruction code.

Each reference below is written from the authors' definition (Expedit-Segmenter `mmseg/ops/cluster.py` and
`mmseg/ops/reconstruction.py`; the same blocks in Expedit-SAM and the Swin repositories), in float64 numpy or
with F.interpolate called on a cell-label map exactly as the authors call it, and the layers are built the way
a patched model builds them: from a ClusterPlan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hgdeploy.core.plan import ClusterPlan
from hgdeploy.layers import own_cells
from hgdeploy.spans.swin import window_layers
from hgdeploy.spans.vit import ClusteredSpan


def _span(token_grid, grid, **options) -> ClusteredSpan:
    """The clustering and reconstruction layers of an official plan, as a patched model holds them."""
    plan = ClusterPlan(token_grid=token_grid, grid=grid, alpha=1, reconstruct_after=2, depth=2,
                       reconstruction="official", **options)
    return ClusteredSpan([], plan, num_prefix_tokens=0)


def authors_label_map(token_grid, grid) -> torch.Tensor:
    """[N] cell label of every token: the h x w map of cell labels upsampled to H x W by nearest interpolation,
    as the authors' calc_init_centroid does (float labels, F.interpolate mode="nearest")."""
    h, w = grid
    labels = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    return F.interpolate(labels, size=token_grid, mode="nearest").reshape(-1)


def authors_mask(token_grid, grid, neighbours) -> np.ndarray:
    """[N, M] bool: the authors' neighbourhood mask, from the label map (float % and // as they compute it)."""
    w, r = grid[1], neighbours // 2
    label = authors_label_map(token_grid, grid)[:, None]
    cell = torch.arange(grid[0] * grid[1], dtype=torch.float32)[None, :]
    rows = torch.div(label, w, rounding_mode="floor") - torch.div(cell, w, rounding_mode="floor")
    return ((label % w - cell % w).abs() <= r).logical_and(rows.abs() <= r).numpy()


def authors_clustering(z: np.ndarray, token_grid, grid, neighbours, iters, tau) -> np.ndarray:
    """The authors' soft k-means in float64: pooled initial centres, softmax over the masked centres, and an
    M-step that divides by the cluster's mass floored at 1e-16 (no other term)."""
    H, W = token_grid
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(z.T.reshape(1, -1, H, W)), grid)
    s = pooled.reshape(z.shape[1], -1).numpy().T  # [M, C]
    penalty = (~authors_mask(token_grid, grid, neighbours)) * 1e16
    for _ in range(iters):
        dist = (z * z).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2 * z @ s.T + penalty  # [N, M]
        logits = -dist / tau
        a = np.exp(logits - logits.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)  # softmax over the centres
        s = (a.T @ z) / np.maximum(a.sum(0), 1e-16)[:, None]
    return s


def authors_reconstruction(s_refined, z, s, k, tau) -> np.ndarray:
    """The authors' TokenReconstructionBlock in float64: w = exp(-d/tau), keep every w >= the k-th largest
    (so centres tied with the k-th are all kept), L2-normalise, mix the refined centres."""
    d = (z * z).sum(1)[:, None] + (s * s).sum(1)[None, :] - 2 * z @ s.T
    weight = np.exp(-d / tau)
    kth = -np.sort(-weight, axis=1)[:, k - 1:k]
    att = np.where(weight >= kth, weight, 0.0)
    att /= np.maximum(np.linalg.norm(att, axis=1, keepdims=True), 1e-12)
    return att @ s_refined


@pytest.mark.parametrize("form", ["dense", "local"])
def test_official_m_step_floors_the_mass_like_the_authors_near_empty_clusters_move(form):
    """Tau = 1 (the SWAG and timm recipes): cluster 0's pooled centre sits between two kinds of tokens, each of
    which is ~20 closer to another centre, so its mass is ~1e-8. The authors move it to its tokens' weighted
    mean anyway (they only floor the mass at 1e-16); the default's 1e-6 guard would keep it near where it was."""
    a = np.sqrt(20.0)
    sign = np.array([[1, -1, 1, 1], [1, -1, 1, 1], [-1, -1, 1, 1], [-1, -1, 1, 1]], dtype=np.float64)
    rng = np.random.default_rng(0)
    z = np.zeros((16, 3))
    z[:, 0] = a * sign.reshape(-1)
    z[:, 1:] = 0.1 * rng.standard_normal((16, 2))
    z[[0, 4], 1:] += 1.0  # the +a tokens of cell 0 differ from the rest: the weighted mean is not a centre's
    expected = authors_clustering(z, (4, 4), (2, 2), 3, 2, 1.0)
    layer = _span((4, 4), (2, 2), neighbours=3, iters=2, tau=1.0, k=2, form=form).clustering.double()
    got = layer(torch.from_numpy(z)[None]).numpy()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def _table_mask(cand: torch.Tensor, penalty: torch.Tensor, shape) -> np.ndarray:
    """[N, M] bool from a neighbour table ([N, J] cluster index, its penalty 0 where valid)."""
    mask = np.zeros(shape, dtype=bool)
    rows = np.repeat(np.arange(shape[0]), cand.shape[1])
    np.logical_or.at(mask, (rows, cand.reshape(-1).numpy()), (penalty == 0).reshape(-1).numpy())
    return mask


@pytest.mark.parametrize("form", ["dense", "local"])
@pytest.mark.parametrize("token_grid,grid", [((46, 44), (28, 26)), ((46, 46), (14, 14))])
def test_official_cells_are_torch_nearest_upsampling_of_the_label_map(form, token_grid, grid):
    """44 -> 26, 46 -> 28 and 46 -> 14 are grid pairs where float32 nearest interpolation puts one boundary
    token in another cell than exact integer division: the neighbourhoods (clustering, neighbourhood
    reconstruction) follow the authors' label map."""
    expected = authors_mask(token_grid, grid, 3)
    span = _span(token_grid, grid, neighbours=3, iters=1, tau=1.0, k=4, form=form,
                 reconstruct_from="neighbourhood")
    c = span.clustering
    got = (c.penalty == 0).numpy() if form == "dense" else _table_mask(c.cand, c.penalty, expected.shape)
    np.testing.assert_array_equal(got, expected)
    r = span.reconstruction
    np.testing.assert_array_equal(_table_mask(r.cand, r.penalty, expected.shape), expected)


def test_official_window_layers_take_the_authors_cells_inside_every_window():
    """SAM and Swin windows (K x K -> k x k) take the same label map per window."""
    clustering, rebuild = window_layers((46, 46), 46, 14, 3, 1, 1.0, 4, "neighbourhood", "dense", "cpu", "official")
    np.testing.assert_array_equal((clustering.inner.penalty == 0).numpy(), authors_mask((46, 46), (14, 14), 3))
    rows, _ = own_cells((46, 46), (14, 14), official=True)
    label = authors_label_map((46, 46), (14, 14))
    assert torch.equal(rows, torch.div(label, 14, rounding_mode="floor").long())


def test_own_cells_official_is_torch_nearest_on_every_grid_pair_up_to_96():
    """The table's formula against F.interpolate itself, including all 35 pairs up to 96 where it differs from
    exact integer division."""
    differ = 0
    for H in range(1, 97):
        for h in range(1, H + 1):
            label = F.interpolate(torch.arange(h, dtype=torch.float32).view(1, 1, h, 1), size=(H, 1), mode="nearest")
            rows, cols = own_cells((H, 1), (h, 1), official=True)
            assert torch.equal(rows, label.view(-1).long()), (H, h)
            assert torch.equal(cols, torch.zeros(H, dtype=torch.long))
            differ += not torch.equal(rows, own_cells((H, 1), (h, 1))[0])
    assert differ == 35



def test_own_cells_official_keep_torchs_cap_where_the_float32_product_reaches_the_grid():
    """ATen caps the nearest index at src - 1. floor(i * scale) cannot reach src below 2^23 tokens a side, but
    5 -> 9718272 (the smallest such size for 5, by a scan of the float32 products) has a product for the last token
    that rounds up to 5, and torch reads cell 4 there."""
    H, h = 9_718_272, 5
    scale = torch.tensor(float(h), dtype=torch.float32) / H
    assert int(torch.floor(torch.tensor(float(H - 1)) * scale)) == h  # uncapped, the last token would read cell 5
    label = F.interpolate(torch.arange(h, dtype=torch.float32).view(1, 1, h), size=H, mode="nearest").view(-1)
    rows, _ = own_cells((H, 1), (h, 1), official=True)
    assert int(rows[-1]) == int(label[-1]) == h - 1 and torch.equal(rows, label.long())

def _tied_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_alpha [4, 4], z [6, 4], s_refined [4, 6]): integer coordinates, so equal squared distances are equal in
    float32 too. k = 2: token 0 is at distance 1 from centres 0, 1, 2; token 3 has centre 0 nearest, then 1 and 2
    tied; token 4 has centre 3 nearest, then 0, 1, 2 tied."""
    s_alpha = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 3]])
    z = torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [2, 0, 0, 1], [0, 0, 0, 2], [1, 0, 1, 0]])
    torch.manual_seed(5)
    return s_alpha, z, torch.randn(4, 6)


def test_official_reconstruction_keeps_every_centre_tied_with_the_kth():
    """The authors keep every weight >= the k-th largest and L2-normalise over them: centres tied with the k-th
    are all kept (token 0: all three at distance 1), where exactly k would drop one of them."""
    s_alpha, z, s_refined = _tied_case()
    expected = authors_reconstruction(s_refined.double().numpy(), z.double().numpy(), s_alpha.double().numpy(), 2,
                                      1.0)
    rec = _span((2, 3), (2, 2), neighbours=3, iters=1, tau=1.0, k=2).reconstruction
    got = rec(s_refined[None], z[None], s_alpha[None]).numpy()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], s_refined[:3].sum(0).numpy() / np.sqrt(3), rtol=1e-5, atol=1e-6)


def test_official_reconstruction_with_ties_exports_static_and_onnx_runtime_keeps_the_ties(tmp_path):
    """The kept set is data-dependent, the graph is not: TopK with a constant K gives the k-th weight and a
    comparison keeps every weight >= it; ONNX Runtime keeps the tied centres as the authors do."""
    import onnx
    import onnxruntime as ort

    from hgdeploy.core.contract import INPUT_NAME, static_shape_problems
    from hgdeploy.patch.export import export_onnx

    s_alpha, z, s_refined = _tied_case()

    class Rebuild(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reconstruction = _span((2, 3), (2, 2), neighbours=3, iters=1, tau=1.0, k=2).reconstruction
            self.register_buffer("z", z[None])
            self.register_buffer("s", s_alpha[None])

        def forward(self, refined):
            return (self.reconstruction(refined, self.z, self.s),)

    path = export_onnx(Rebuild().eval(), s_refined[None], tmp_path / "rebuild.onnx", ("tokens",))
    graph = onnx.load(str(path))
    assert static_shape_problems(graph) == []
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: s_refined[None].numpy()})[0][0]
    expected = authors_reconstruction(s_refined.double().numpy(), z.double().numpy(), s_alpha.double().numpy(), 2,
                                      1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
