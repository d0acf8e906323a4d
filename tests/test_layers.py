"""The two layers on their own: pooling, neighbourhoods, both clustering forms, reconstruction."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hgdeploy.layers import (
    TokenClustering,
    TokenReconstruction,
    choose_form,
    clustering_macs,
    neighbour_table,
    neighbourhood_mask,
    pooling_matrix,
)
from hgdeploy.measure.flops import count_gflops

GRIDS = [((32, 32), (24, 24)), ((40, 40), (28, 28)), ((16, 16), (8, 8)), ((7, 9), (3, 4)), ((30, 30), (20, 20))]


@pytest.mark.parametrize("token_grid,grid", GRIDS)
def test_pooling_matrix_is_adaptive_avg_pool(token_grid, grid):
    H, W = token_grid
    z = torch.randn(2, H * W, 5)
    expected = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(2, 5, H, W), grid).flatten(2).transpose(1, 2)
    got = pooling_matrix(token_grid, grid) @ z
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_neighbourhood_is_lambda_by_lambda_around_own_cell():
    mask = neighbourhood_mask((8, 8), (4, 4), 3)
    # token (0, 0) starts in cell (0, 0): it sees cells (0..1, 0..1) only
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # token (4, 4) starts in cell (2, 2): a full 3x3 block
    assert int(mask[4 * 8 + 4].sum()) == 9
    index, valid = neighbour_table((8, 8), (4, 4), 3)
    for p in range(64):
        assert sorted(index[p][valid[p]].tolist()) == mask[p].nonzero().flatten().tolist()


@pytest.mark.parametrize("token_grid,grid", GRIDS)
@pytest.mark.parametrize("tau", [0.05, 1.0, 50.0])
def test_local_and_dense_forms_agree(token_grid, grid, tau):
    """Same function; in float64 because hard assignments (small tau) amplify float32 rounding."""
    torch.manual_seed(0)
    z = torch.randn(2, token_grid[0] * token_grid[1], 16, dtype=torch.float64)
    dense = TokenClustering(token_grid, grid, 5, 3, tau, form="dense").double()
    local = TokenClustering(token_grid, grid, 5, 3, tau, form="local").double()
    torch.testing.assert_close(local(z), dense(z), rtol=1e-9, atol=1e-9)


def test_clustering_moves_centres_towards_their_tokens():
    """Two flat regions: after k-means the centres sit on the two region values, not on their blend."""
    z = torch.zeros(1, 8 * 8, 2)
    z[0, :, 0] = torch.tensor([1.0 if (p % 8) < 3 else -1.0 for p in range(64)])
    pooled = pooling_matrix((8, 8), (2, 2)) @ z
    clustered = TokenClustering((8, 8), (2, 2), 3, 5, 0.05)(z)
    assert (pooled[0, [0, 2], 0].abs() < 1).all()  # the left cells blend both regions
    torch.testing.assert_close(clustered[0, :, 0].abs(), torch.ones(4), rtol=0, atol=1e-3)


@pytest.mark.parametrize("form", ["dense", "local"])
def test_identity_grid_and_tiny_tau_is_identity(form):
    torch.manual_seed(1)
    z = torch.randn(1, 36, 8)
    s = TokenClustering((6, 6), (6, 6), 3, 5, 1e-4, form=form)(z)
    torch.testing.assert_close(s, z, rtol=1e-5, atol=1e-5)
    rec = TokenReconstruction(k=4, tau=1e-4)
    torch.testing.assert_close(rec(s * 2, z, s), z * 2, rtol=1e-5, atol=1e-5)


def test_softmax_reconstruction_survives_large_distances_official_underflows():
    torch.manual_seed(2)
    z = torch.randn(1, 16, 8) * 100  # distances ~1e5, tau 1: exp(-d^2/tau) is exactly 0 in fp32
    s = torch.randn(1, 4, 8) * 100
    soft = TokenReconstruction(k=2, tau=1.0, variant="softmax")(s, z, s)
    official = TokenReconstruction(k=2, tau=1.0, variant="official")(s, z, s)
    assert torch.isfinite(soft).all() and soft.abs().sum() > 0
    assert official.abs().sum() == 0  # the documented failure mode of the official formula


def test_official_weights_are_l2_normalised_softmax_weights_sum_to_one():
    torch.manual_seed(3)
    z, s = torch.randn(1, 10, 4), torch.randn(1, 6, 4)
    w_soft, idx_soft = TokenReconstruction(k=3, tau=5.0, variant="softmax").weights(z, s)
    w_off, idx_off = TokenReconstruction(k=3, tau=5.0, variant="official").weights(z, s)
    torch.testing.assert_close(w_soft.sum(-1), torch.ones(1, 10))
    torch.testing.assert_close(w_off.norm(dim=-1), torch.ones(1, 10))
    # official: weights over all M centres, nonzero on the same k (no ties here; tests/test_official.py has them)
    assert w_off.shape == (1, 10, 6) and torch.equal(idx_off, torch.arange(6).expand(10, 6))
    assert torch.equal((w_off > 0).nonzero()[:, 2].view(1, 10, 3), idx_soft.sort(-1).values)
    d2 = torch.cdist(z, s) ** 2
    assert torch.equal(idx_soft.sort(-1).values, d2.topk(3, largest=False).indices.sort(-1).values)


@pytest.mark.parametrize("variant", ["softmax", "official"])
def test_neighbourhood_reconstruction_identity_and_support(variant):
    """Rebuilt from the lambda x lambda cells around each token: identity at zero reduction; no weight elsewhere."""
    torch.manual_seed(4)
    z = torch.randn(1, 36, 8)
    cells = neighbour_table((6, 6), (6, 6), 3)
    rec = TokenReconstruction(k=4, tau=1e-4, variant=variant, neighbourhood=cells)
    torch.testing.assert_close(rec(z * 2, z, z), z * 2, rtol=1e-5, atol=1e-5)
    s = torch.randn(1, 9, 8)
    cells = neighbour_table((6, 6), (3, 3), 3)
    w, index = TokenReconstruction(k=4, tau=5.0, variant="softmax", neighbourhood=cells).weights(z, s)
    assert w.shape == (1, 36, 9) and torch.equal(index, cells[0])
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 36))
    assert (w[0][~cells[1]] < 1e-12).all()  # cells off the grid get nothing


@pytest.mark.parametrize("form", ["dense", "local"])
def test_the_form_choice_counts_the_multiply_adds_torch_counts(form):
    """clustering_macs, which picks the form, against torch's own count of the layer's forward (one multiply-add =
    one FLOP), on a non-divisible grid: the pooling, then per round the E-step's and the M-step's products."""
    token_grid, grid, lam, iters, C = (7, 9), (3, 4), 3, 2, 5
    tables = TokenClustering(token_grid, grid, lam, iters, 1.0, form="local")
    J, T, P = tables.cand.shape[1], tables.inv_token.shape[1], tables.pool_col.shape[1]
    macs = clustering_macs(63, 12, C, J, T, P, iters)
    layer = TokenClustering(token_grid, grid, lam, iters, 1.0, form=form)
    assert count_gflops(layer, torch.randn(1, 63, C)).total * 1e9 == pytest.approx(macs[form], rel=1e-9)


def test_auto_form_is_dense_on_a_gpu_and_cheapest_on_a_cpu():
    macs = {"dense": 100, "local": 10}
    assert choose_form("auto", macs, "cpu")[0] == "local" and choose_form("auto", macs, "gpu")[0] == "dense"
    assert choose_form("auto", {"dense": 10, "local": 100}, "cpu")[0] == "dense"
    # a layer decides on its own multiply-adds: many tokens per cluster favour the local form, few the dense one
    assert TokenClustering((32, 32), (24, 24), 5, 5, 1.0).form == "local"
    assert TokenClustering((7, 9), (3, 4), 5, 5, 1.0).form == "dense"
    assert TokenClustering((32, 32), (24, 24), 5, 5, 1.0, device="gpu").form == "dense"
    form, why = choose_form("local", macs, "gpu")
    assert form == "local" and "set by cluster.form" in why  # a form the recipe forces is kept
    assert "the local form needs 0.10x the multiply-adds" in choose_form("auto", macs, "gpu")[1]
