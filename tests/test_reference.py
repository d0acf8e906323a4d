"""The two layers against an independent reference written from the paper's definitions (method.md).

The reference below is plain numpy float64 with explicit loops over tokens and cells; it shares nothing with
hgdeploy.layers (no tables, no masks, no pooling matrix): adaptive average pooling for the initial centres,
kappa rounds of an E-step softmax of -||z - s||^2 / tau over the lambda x lambda cells around each token's own
cell (row floor(i h / H), column floor(j w / W)) and an M-step weighted mean; reconstruction as a softmax of
-d^2 / tau over each token's k nearest clustering-time centres (or its lambda neighbourhood), applied to the
refined centres. The layers run in float64 and are built the way the spans build them (spans.vit, spans.swin).

Temperatures are chosen so that the reference's soft assignments are neither one-hot nor uniform (asserted on
the reference itself), so a wrong temperature, neighbourhood or weighting shows in the outputs. The layers'
empty-cluster guard (EMPTY_CLUSTER_EPS) is not in the reference: every test asserts that each cluster's mass
(the sum of its weights) is at least MIN_MASS, where the guard moves a centre by at most ~1e-6 of a step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import layer_sharpness

from hgdeploy.core.plan import ClusterPlan
from hgdeploy.layers import TAU_SHARPNESS, TokenClustering, TokenReconstruction, calibrate_tau
from hgdeploy.spans.swin import window_layers
from hgdeploy.spans.vit import reconstruction_for

MIN_MASS = 0.5
TOL = 1e-5  # the guard's effect at MIN_MASS is ~2e-6 of a centre's move; float64 rounding is ~1e-13


# ---------------------------------------------------------------------------------------------- the reference


def ref_pool(z: np.ndarray, token_grid: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling of the [H*W, C] token grid to h x w cells: cell (i, j) averages token rows
    floor(i H / h) .. ceil((i + 1) H / h) - 1 and the same for columns."""
    (H, W), (h, w) = token_grid, grid
    s = np.zeros((h * w, z.shape[1]))
    for i in range(h):
        r0, r1 = (i * H) // h, -(-((i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -(-((j + 1) * W) // w)
            members = [z[r * W + c] for r in range(r0, r1) for c in range(c0, c1)]
            s[i * w + j] = np.mean(members, axis=0)
    return s


def ref_cells(p: int, token_grid: tuple[int, int], grid: tuple[int, int], lam: int) -> list[int]:
    """The cluster cells in the lam x lam block around token p's own cell, those on the grid."""
    (H, W), (h, w) = token_grid, grid
    r, c = divmod(p, W)
    own_r, own_c = (r * h) // H, (c * w) // W
    rad = lam // 2
    return [i * w + j for i in range(own_r - rad, own_r + rad + 1) for j in range(own_c - rad, own_c + rad + 1)
            if 0 <= i < h and 0 <= j < w]


def ref_softmax(logits: list[float]) -> np.ndarray:
    a = np.asarray(logits, dtype=np.float64)
    e = np.exp(a - a.max())
    return e / e.sum()


def sqdist(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a, b)))


def ref_cluster(z: np.ndarray, token_grid, grid, lam: int, iters: int, tau: float):
    """Soft k-means of one image's [N, C] tokens: (centres [M, C], each round's [N, M] weights, its masses [M])."""
    N, M = z.shape[0], grid[0] * grid[1]
    s = ref_pool(z, token_grid, grid)
    weights, masses = [], []
    for _ in range(iters):
        q = np.zeros((N, M))
        for p in range(N):
            cells = ref_cells(p, token_grid, grid, lam)
            for m, wgt in zip(cells, ref_softmax([-sqdist(z[p], s[m]) / tau for m in cells])):
                q[p, m] = wgt
        mass = np.array([sum(q[p, m] for p in range(N)) for m in range(M)])
        s = np.array([sum(q[p, m] * z[p] for p in range(N)) / mass[m] for m in range(M)])
        weights.append(q)
        masses.append(mass)
    return s, weights, masses


def ref_reconstruct(z_alpha: np.ndarray, s_alpha: np.ndarray, s_refined: np.ndarray, tau: float, k: int | None,
                    candidates=None, variant: str = "softmax", excluded: frozenset = frozenset(),
                    tokens=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each token rebuilt from its k nearest clustering-time centres (candidates None) or from candidates(p),
    never from `excluded` centres; weights softmax(-d^2 / tau) ("softmax") or exp(-d^2 / tau) with unit L2 norm
    ("official"). Returns ([N, C] tokens, each token's weights)."""
    N, M = z_alpha.shape[0], s_alpha.shape[0]
    out = np.zeros((N, s_refined.shape[1]))
    all_w = []
    for p in (range(N) if tokens is None else tokens):
        pool = [m for m in (range(M) if candidates is None else candidates(p)) if m not in excluded]
        d = {m: sqdist(z_alpha[p], s_alpha[m]) for m in pool}
        cells = sorted(pool, key=d.get)[:k] if candidates is None else pool
        if variant == "softmax":
            w = ref_softmax([-d[m] / tau for m in cells])
        else:
            e = np.array([math.exp(-d[m] / tau) for m in cells])
            w = e / math.sqrt(float(sum(x * x for x in e)))
        out[p] = sum(wi * s_refined[m] for wi, m in zip(w, cells))
        all_w.append(w)
    return out, all_w


def assert_soft(weights: list[np.ndarray], high: float = 0.85) -> None:
    """The reference's weights are neither one-hot nor uniform: each token's largest weight is, on average, at
    least 0.15 above 1/J (uniform over its J candidates) and below `high` (hard assignment: 1), and fewer than
    one token in ten has a largest weight above 0.99."""
    tops = np.array([float(np.max(w)) for w in weights])
    uniform = np.array([1.0 / len(w) for w in weights])
    assert (tops - uniform).mean() > 0.15 and tops.mean() < high, (tops.mean(), uniform.mean())
    assert (tops > 0.99).mean() < 0.1


def rows_of(q: np.ndarray) -> list[np.ndarray]:
    return [row[row > 0] for row in q]


def tokens(B: int, N: int, C: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, N, C))


# ------------------------------------------------------------------------------------------- plain layers

# (token grid, cluster grid, lambda, kappa, tau): divisible and non-divisible grids; tau where the weights are soft
PLAIN = [((8, 8), (4, 4), 3, 3, 1.5), ((7, 9), (3, 4), 3, 2, 1.0), ((10, 10), (4, 4), 5, 3, 1.0),
         ((6, 5), (4, 3), 3, 3, 1.5)]


@pytest.mark.parametrize("form", ["dense", "local"])
@pytest.mark.parametrize("token_grid,grid,lam,iters,tau", PLAIN)
def test_clustering_is_soft_k_means_by_the_definition(token_grid, grid, lam, iters, tau, form):
    B, C = 2, 6
    z = tokens(B, token_grid[0] * token_grid[1], C, seed=sum(token_grid) + lam)
    layer = TokenClustering(token_grid, grid, lam, iters, tau, form=form).double()
    assert layer.form == form
    got = layer(torch.from_numpy(z)).numpy()
    for b in range(B):
        want, weights, masses = ref_cluster(z[b], token_grid, grid, lam, iters, tau)
        for q, mass in zip(weights, masses):
            assert_soft(rows_of(q))
            assert mass.min() >= MIN_MASS, mass.min()
        np.testing.assert_allclose(got[b], want, rtol=TOL, atol=TOL)


def test_the_reference_pooling_is_torch_adaptive_average_pooling():
    """The reference's own check: its initial centres are torch's adaptive_avg_pool2d (non-divisible too)."""
    for (H, W), (h, w) in (((7, 9), (3, 4)), ((10, 10), (4, 4)), ((6, 5), (4, 3))):
        z = tokens(1, H * W, 3, seed=H * W)[0]
        grid = torch.from_numpy(z.T.reshape(1, 3, H, W))
        want = torch.nn.functional.adaptive_avg_pool2d(grid, (h, w)).reshape(3, h * w).T.numpy()
        np.testing.assert_allclose(ref_pool(z, (H, W), (h, w)), want, rtol=1e-12, atol=1e-12)


def _clustered(token_grid, grid, lam, iters, tau, seed, C=6):
    """(tokens, clustering-time centres, refined centres) of one image, from the reference."""
    z = tokens(1, token_grid[0] * token_grid[1], C, seed)[0]
    s, _, _ = ref_cluster(z, token_grid, grid, lam, iters, tau)
    refined = s + np.random.default_rng(seed + 1).standard_normal(s.shape)  # what the blocks in between made
    return z, s, refined


@pytest.mark.parametrize("variant", ["softmax", "official"])
@pytest.mark.parametrize("token_grid,grid,k,tau", [((8, 8), (4, 4), 4, 1.0), ((7, 9), (3, 4), 5, 1.0)])
def test_reconstruction_from_the_k_nearest_centres_by_the_definition(token_grid, grid, k, tau, variant):
    """Distances at clustering time (z_alpha, s_alpha), weights over the k nearest, applied to the refined
    centres. "official" only where it cannot underflow and distances do not tie (its behaviour there is the
    authors': exp, top-k, L2 norm)."""
    z, s, refined = _clustered(token_grid, grid, 3, 2, 2.0, seed=7)
    want, weights = ref_reconstruct(z, s, refined, tau, k, variant=variant)
    if variant == "softmax":
        assert_soft(weights)
    else:
        assert min(float(np.max(w)) for w in weights) > 1e-3  # far from underflow
    layer = TokenReconstruction(k, tau, variant).double()
    got = layer(*(torch.from_numpy(a)[None] for a in (refined, z, s)))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["softmax", "official"])
@pytest.mark.parametrize("token_grid,grid,lam,tau", [((8, 8), (4, 4), 3, 1.5), ((7, 9), (3, 4), 3, 1.5),
                                                     ((10, 10), (4, 4), 5, 1.0)])
def test_reconstruction_from_the_neighbourhood_by_the_definition(token_grid, grid, lam, tau, variant):
    """The lambda x lambda cells around each token's own cell as the candidates (plan reconstruct_from
    "neighbourhood"), built by spans.vit as a plan builds it; "official": exp(-d^2 / tau) of every candidate,
    L2-normalised (here most tokens' weights have a norm below 1, so dividing by it matters)."""
    z, s, refined = _clustered(token_grid, grid, lam, 2, 2.0, seed=11)
    want, weights = ref_reconstruct(z, s, refined, tau, None, lambda p: ref_cells(p, token_grid, grid, lam), variant)
    if variant == "softmax":
        assert_soft(weights)
    else:
        norms = [math.sqrt(sum(math.exp(-sqdist(z[p], s[m]) / tau) ** 2 for m in ref_cells(p, token_grid, grid, lam)))
                 for p in range(len(z))]
        assert np.mean(np.array(norms) < 1) > 0.5 and min(norms) > 1e-6  # far from underflow
    plan = ClusterPlan(token_grid=token_grid, grid=grid, alpha=1, reconstruct_after=2, depth=2, neighbours=lam,
                       tau=tau, k=4, reconstruct_from="neighbourhood", reconstruction=variant)
    layer = reconstruction_for(plan).double()
    assert layer.candidates == "neighbourhood" and layer.variant == variant
    got = layer(*(torch.from_numpy(a)[None] for a in (refined, z, s)))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ padded windows


def ref_windows(x: np.ndarray, K: int, k: int, lam: int, iters: int, tau: float):
    """One image's [H, W, C] map zero-padded right and bottom to whole K x K windows, each window clustered to
    k x k on its own grid. Returns (kept clusters [h', w', C], {window: (tokens, centres, masses, weights)},
    the kept-cluster test) where a cluster is kept when the first token row and column of its cell (padded map
    coordinates) lie inside the unpadded map."""
    H, W, C = x.shape
    Hp, Wp = -(-H // K) * K, -(-W // K) * K
    xp = np.zeros((Hp, Wp, C))
    xp[:H, :W] = x
    full = np.zeros((Hp // K * k, Wp // K * k, C))
    per_window = {}
    for a in range(Hp // K):
        for b in range(Wp // K):
            zw = xp[a * K:(a + 1) * K, b * K:(b + 1) * K].reshape(K * K, C)
            s, weights, masses = ref_cluster(zw, (K, K), (k, k), lam, iters, tau)
            full[a * k:(a + 1) * k, b * k:(b + 1) * k] = s.reshape(k, k, C)
            per_window[a, b] = (zw, s, masses, weights)

    def kept(gi: int, gj: int) -> bool:
        (a, li), (b, lj) = divmod(gi, k), divmod(gj, k)
        return a * K + (li * K) // k < H and b * K + (lj * K) // k < W

    rows = [i for i in range(full.shape[0]) if kept(i, 0)]
    cols = [j for j in range(full.shape[1]) if kept(0, j)]
    return full[: len(rows), : len(cols)], per_window, kept


def ref_window_reconstruct(shape, refined: np.ndarray, per_window, kept, K: int, k: int, tau: float,
                           nearest: int | None, lam: int | None):
    """Every token of the map rebuilt inside its window from that window's kept clusters (refined values from
    the kept map), by its k nearest clustering-time centres or its lam x lam neighbourhood."""
    H, W, C = shape
    out = np.zeros((H, W, C))
    weights = []
    for (a, b), (zw, s, _, _) in per_window.items():
        local = [(li, lj) for li in range(k) for lj in range(k)]
        excluded = frozenset(m for m, (li, lj) in enumerate(local) if not kept(a * k + li, b * k + lj))
        ref = np.zeros((k * k, C))
        for m, (li, lj) in enumerate(local):
            if m not in excluded:
                ref[m] = refined[a * k + li, b * k + lj]
        inside = [r * K + c for r in range(K) for c in range(K) if a * K + r < H and b * K + c < W]
        cands = None if lam is None else (lambda p: ref_cells(p, (K, K), (k, k), lam))
        rebuilt, w = ref_reconstruct(zw, s, ref, tau, nearest, cands, excluded=excluded, tokens=inside)
        weights += w
        for p in inside:
            r, c = divmod(p, K)
            out[a * K + r, b * K + c] = rebuilt[p]
    return out, weights


# (map size, window K, clustered window k, lambda, kappa, tau, reconstruction candidates)
WINDOWS = [((10, 7), 4, 3, 3, 2, 1.5, "nearest"), ((13, 11), 6, 4, 3, 2, 1.5, "neighbourhood"),
           ((8, 8), 4, 3, 3, 2, 1.5, "nearest")]


@pytest.mark.parametrize("form", ["dense", "local"])
@pytest.mark.parametrize("size,K,k,lam,iters,tau,cands", WINDOWS)
def test_window_layers_cluster_and_rebuild_each_padded_window_by_the_definition(size, K, k, lam, iters, tau, cands,
                                                                                form):
    """The window layers (spans.swin.window_layers, as the Swin and SAM spans build them) on maps that are not
    whole windows: zero padding, clusters whose cell starts in the padding dropped from the output and from
    every token's candidates, the map cropped back."""
    B, C = 2, 5
    x = np.random.default_rng(size[0] * size[1] + K).standard_normal((B, *size, C))
    rec_k = 4
    clustering, reconstruction = window_layers(size, K, k, lam, iters, tau, rec_k, cands, form, "cpu", "softmax")
    clustering, reconstruction = clustering.double(), reconstruction.double()
    assert clustering.form == form
    clusters, z, s = clustering(torch.from_numpy(x))
    refined = clusters + torch.from_numpy(np.random.default_rng(3).standard_normal(tuple(clusters.shape)))
    rebuilt = reconstruction(refined, z, s).numpy()
    for b in range(B):
        want, per_window, kept = ref_windows(x[b], K, k, lam, iters, tau)
        assert min(m.min() for _, _, masses, _ in per_window.values() for m in masses) >= MIN_MASS
        assert_soft([row for _, _, _, weights in per_window.values() for row in rows_of(weights[0])])
        assert clusters.shape[1:3] == want.shape[:2]
        np.testing.assert_allclose(clusters[b].numpy(), want, rtol=TOL, atol=TOL)
        tokens_want, w = ref_window_reconstruct(x[b].shape, refined[b].numpy(), per_window, kept, K, k, tau,
                                                rec_k if cands == "nearest" else None,
                                                lam if cands == "neighbourhood" else None)
        assert_soft(w)
        assert rebuilt.shape[1:] == tokens_want.shape
        np.testing.assert_allclose(rebuilt[b], tokens_want, rtol=TOL, atol=TOL)
    if size == (10, 7):  # the case this parametrisation exists for: a bottom row of clusters in the padding
        assert clusters.shape[1:3] == (8, 6)


# ------------------------------------------------------------------------------------------------ tau = auto


@pytest.mark.parametrize("form", ["dense", "local"])
def test_auto_tau_gives_the_layers_own_first_assignment_the_target_sharpness(form):
    """calibrate_tau's temperature, put into the layer, makes the reference's first E-step and the layer's own (its
    softmax, read as it runs) have mean largest weight TAU_SHARPNESS."""
    token_grid, grid, lam = (8, 8), (4, 4), 3
    z = tokens(1, 64, 6, seed=5)
    tau = calibrate_tau(TokenClustering(token_grid, grid, lam, 1, 1.0, form=form), torch.from_numpy(z).float())
    _, weights, _ = ref_cluster(z[0], token_grid, grid, lam, 1, tau)
    assert float(np.mean([row.max() for row in weights[0]])) == pytest.approx(TAU_SHARPNESS, abs=0.01)
    layer = TokenClustering(token_grid, grid, lam, 2, tau, form=form).double()
    assert layer_sharpness(layer, torch.from_numpy(z)) == pytest.approx(TAU_SHARPNESS, abs=0.01)
