"""Token clustering: local soft k-means, [B, N, C] tokens -> [B, M, C] cluster centres, in two forms.

No model knowledge lives here. Shapes: B batch, N = H*W tokens, M = h*w clusters, C channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hgdeploy.core.plan import FORMS
from hgdeploy.layers.mixing import WeightedSum
from hgdeploy.layers.tables import (
    MASK_PENALTY,
    inverse_table,
    neighbour_table,
    neighbourhood_mask,
    pooling_matrix,
    sparse_rows,
    squared_distances,
    take,
)

# Keeps a centre where it was when (almost) no token is assigned to it, instead of 0/eps.
EMPTY_CLUSTER_EPS = 1e-6
# The authors' guard (`official`): the mass is only floored, Σ q z / max(Σ q, 1e-16); the old centre plays no
# part, so a near-empty cluster still moves to its tokens' weighted mean and an empty one falls to 0.
OFFICIAL_MASS_FLOOR = 1e-16


def clustering_macs(n: int, m: int, c: int, j: int, t: int, p: int, iters: int) -> dict[str, int]:
    """Multiply-adds of the two clustering forms, to pick the cheaper one per plan."""
    return {"dense": n * m * c + iters * 2 * n * m * c, "local": m * p * c + iters * (n * j * c + m * t * c)}


def choose_form(form: str, macs: dict[str, int], device: str = "cpu") -> tuple[str, str]:
    """(form, why) for a requested form on a device.

    "auto" on a CPU takes the form with fewer multiply-adds (both grow linearly with the channel
    count, so the choice holds for any width); on a GPU it takes the dense form: its matmuls beat the
    local form's gathers there although they do more multiply-adds (measured on an H100 for DINOv2-S
    and Segmenter ViT-L, both in eager mode and with CUDA graphs).
    """
    if form not in FORMS:
        raise ValueError(f"unknown clustering form {form!r}")
    if form != "auto":
        chosen, why = form, "set by cluster.form"
    elif device == "gpu":
        chosen, why = "dense", "auto on a GPU: the dense form's matmuls beat the local form's gathers there"
    else:
        chosen, why = min(macs, key=macs.get), "auto on a CPU: fewer multiply-adds"
    other = "local" if chosen == "dense" else "dense"
    return chosen, f"{why}; the {other} form needs {macs[other] / max(macs[chosen], 1):.2f}x the multiply-adds"


class TokenClustering(nn.Module):
    """Local soft k-means: [B, N, C] tokens -> [B, M, C] cluster centres.

    Centres start as the adaptive average pool of the token grid; each of `iters` rounds gives
    every token a softmax over -d^2/tau restricted to the clusters around its own cell (E-step),
    then moves each centre to the weighted mean of its tokens (M-step).

    form "dense" works on the full [N, M] matrix with a constant mask (the official layout);
    "local" touches only each token's J = neighbours^2 candidate clusters through gathers with
    constant indices. Both compute the same function; "auto" picks per device (`choose_form`).

    Written for a cheap engine: the E-step's logits are one GEMM with centres pre-scaled by 2/tau minus
    |s|^2/tau (the token's own |z|^2/tau is dropped: a softmax over clusters does not see it), so the
    [N, M] matrix is touched by three ops (GEMM, mask, softmax) instead of six; the M-step normalises
    the weights per cluster before its GEMM, which makes that GEMM (and the initial pooling) safe in fp16
    (`mixing.WeightedSum`); the distances and the softmax stay fp32.

    Two choices differ from the authors' code unless `official` (what plans with reconstruction "official" build):
    the M-step divides by (mass + EMPTY_CLUSTER_EPS) and adds EMPTY_CLUSTER_EPS / (mass + eps) of the old centre
    (a near-empty cluster stays put; theirs: mass floored at OFFICIAL_MASS_FLOOR, no old centre), and a token's
    own cell is (i * h) // H (theirs: torch's nearest upsampling of the cell-label map, `tables.own_cells`).
    """

    def __init__(self, token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int, iters: int, tau: float,
                 form: str = "auto", device: str = "cpu", official: bool = False):
        super().__init__()
        self.iters = iters
        self.inv_tau = 1.0 / tau
        self.official = official
        self.spec = {"token_grid": list(token_grid), "grid": list(grid), "neighbours": neighbours, "iters": iters,
                     "tau": tau, "official": official}
        pool = pooling_matrix(token_grid, grid)
        index, valid = neighbour_table(token_grid, grid, neighbours, official)
        token, slot, ok = inverse_table(index, valid, pool.shape[0])
        pool_col, pool_w = sparse_rows(pool)
        macs = clustering_macs(pool.shape[1], pool.shape[0], 1, index.shape[1], token.shape[1], pool_col.shape[1], iters)
        form, self.form_reason = choose_form(form, macs, device)
        self.form = form
        self.spec["form"] = form
        self.fp16_pool, self.fp16_mix = WeightedSum(), WeightedSum(transposed=form == "dense")
        if form == "dense":
            self.register_buffer("pool", pool, persistent=False)
            mask = neighbourhood_mask(token_grid, grid, neighbours, official)
            self.register_buffer("penalty", (~mask).float() * MASK_PENALTY, persistent=False)
        else:
            self.register_buffer("pool_col", pool_col, persistent=False)
            self.register_buffer("pool_w", pool_w, persistent=False)
            self.register_buffer("cand", index, persistent=False)
            self.register_buffer("penalty", (~valid).float() * MASK_PENALTY, persistent=False)
            self.register_buffer("inv_token", token, persistent=False)
            self.register_buffer("inv_slot", slot, persistent=False)
            self.register_buffer("inv_valid", ok.float(), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        return self._dense(z) if self.form == "dense" else self._local(z)

    def _dense(self, z: Tensor) -> Tensor:
        s = self.fp16_pool(self.pool, z)
        for _ in range(self.iters):
            t = s * (2.0 * self.inv_tau)  # [B, M, C]: pre-scaled centres
            logits = torch.matmul(z, t.transpose(1, 2)) - 0.5 * (t * s).sum(-1).unsqueeze(1) - self.penalty
            q = torch.softmax(logits, dim=-1)  # [B, N, M], each token's weights over its clusters
            inv, old = self._inverse_mass(q.sum(1).unsqueeze(-1))  # [B, M, 1]
            moved = self.fp16_mix(q * inv.transpose(1, 2), z)
            s = moved if old is None else moved + old * s
        return s

    def _inverse_mass(self, mass: Tensor) -> tuple[Tensor, Tensor | None]:
        """(1 / what the M-step divides each cluster's weighted sum by, the share of the old centre it adds or
        None) from the clusters' masses [B, M, 1]."""
        if self.official:
            return 1.0 / mass.clamp_min(OFFICIAL_MASS_FLOOR), None
        inv = 1.0 / (mass + EMPTY_CLUSTER_EPS)
        return inv, EMPTY_CLUSTER_EPS * inv

    def _local(self, z: Tensor) -> Tensor:
        # Products are written as batched MatMuls: ONNX Runtime runs those faster than Einsum.
        s = self.fp16_pool(self.pool_w.unsqueeze(-2), take(z, self.pool_col)).squeeze(-2)  # [B, M, C]
        z_inv = take(z, self.inv_token)  # [B, M, T, C]: the tokens each cluster can receive
        for _ in range(self.iters):
            t = s * (2.0 * self.inv_tau)
            cross = (take(t, self.cand) @ z.unsqueeze(-1)).squeeze(-1)  # [B, N, J]
            tt = 0.5 * (t * s).sum(-1)  # [B, M]: |s|^2 / tau, once per centre, then picked per candidate
            logits = cross - tt.index_select(1, self.cand.reshape(-1)).view_as(cross) - self.penalty
            q = torch.softmax(logits, dim=-1)  # [B, N, J]
            q_inv = q.flatten(1).index_select(1, self.inv_slot.reshape(-1)).view(q.shape[0], *self.inv_slot.shape)
            q_inv = q_inv * self.inv_valid  # [B, M, T]
            inv, old = self._inverse_mass(q_inv.sum(-1, keepdim=True))  # [B, M, 1]
            moved = self.fp16_mix((q_inv * inv).unsqueeze(-2), z_inv).squeeze(-2)
            s = moved if old is None else moved + old * s
        return s

    def initial_distances(self, z: Tensor) -> Tensor:
        """Squared distances of every token to its candidate clusters at the initial (pooled) centres, the
        non-candidates pushed out by the mask penalty: [B, N, M] (dense) or [B, N, J] (local)."""
        if self.form == "dense":
            return squared_distances(z, torch.matmul(self.pool, z)) + self.penalty
        s = (self.pool_w.unsqueeze(-2) @ take(z, self.pool_col)).squeeze(-2)
        cand = take(s, self.cand)  # [B, N, J, C]
        cross = (cand @ z.unsqueeze(-1)).squeeze(-1)
        return (z * z).sum(-1, keepdim=True) + (cand * cand).sum(-1) - 2.0 * cross + self.penalty
