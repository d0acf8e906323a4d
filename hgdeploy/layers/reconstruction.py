"""Token reconstruction, and the paper's parameter-free baselines in place of the two layers.

Shapes: B batch, N = H*W tokens, M = h*w clusters, C channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hgdeploy.core.plan import RECONSTRUCTIONS
from hgdeploy.layers.mixing import WeightedSum
from hgdeploy.layers.tables import MASK_PENALTY, pooling_matrix, squared_distances, take


class TokenPooling(nn.Module):
    """The paper's baseline in place of clustering: the token grid average-pooled to the cluster grid
    (the clustering's initial centres, never refined). [B, N, C] -> [B, M, C]."""

    def __init__(self, token_grid: tuple[int, int], grid: tuple[int, int]):
        super().__init__()
        self.register_buffer("pool", pooling_matrix(token_grid, grid), persistent=False)
        self.fp16_pool = WeightedSum()

    def forward(self, z: Tensor) -> Tensor:
        return self.fp16_pool(self.pool, z)


class BilinearUpsampling(nn.Module):
    """The paper's baseline in place of reconstruction: the cluster grid upsampled bilinearly to the token
    grid (a constant [N, M] matrix, torch's half-pixel convention). [B, M, C] -> [B, N, C]; the clustering-time
    tokens and centres TokenReconstruction takes are ignored."""

    def __init__(self, token_grid: tuple[int, int], grid: tuple[int, int]):
        super().__init__()
        h, w = grid
        basis = torch.eye(h * w).view(h * w, 1, h, w)
        up = torch.nn.functional.interpolate(basis, size=token_grid, mode="bilinear", align_corners=False)
        self.register_buffer("up", up.view(h * w, -1).t().contiguous(), persistent=False)
        self.fp16_up = WeightedSum()

    def forward(self, s_refined: Tensor, z_alpha: Tensor | None = None, s_alpha: Tensor | None = None) -> Tensor:
        return self.fp16_up(self.up, s_refined)


class TokenReconstruction(nn.Module):
    """Rebuild [B, N, C] tokens from refined centres [B, M, C].

    Each token takes its candidate clustering-time centres and mixes the refined centres with weights
      "softmax":  softmax over the candidates' logits -d^2/tau (log space: never all-zero), or
      "official": exp(-d^2/tau) of the candidates, L2-normalised (the authors' code; may underflow).
    The candidates: the k nearest of all M centres (distances between z_alpha and s_alpha, a TopK
    over an [N, M] matrix; the official choice), or with `neighbourhood` = (index, valid) from
    `neighbour_table` the J = lambda^2 cells around the token's own cell, as in the clustering's
    E-step (no TopK and no [N, M] matrix; the paper reports the same quality).

    Nearest candidates and ties: "softmax" takes exactly k (TopK's indices, then a gather of k centres);
    "official" keeps, as the authors do, every centre whose weight is >= the k-th largest, so centres tied
    with the k-th are all kept. Their number depends on the data, so the official layer keeps the whole
    [N, M] weight matrix, zeroes the weights below the k-th (TopK with the constant K = k gives the
    threshold) and mixes all M refined centres with one MatMul: static shapes, k..M centres per token.
    """

    def __init__(self, k: int, tau: float, variant: str = "softmax", neighbourhood: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        if variant not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction variant {variant!r}")
        self.k = k
        self.inv_tau = 1.0 / tau
        self.variant = variant
        self.fp16_mix = WeightedSum()  # the weights sum to 1 (softmax) or have unit L2 norm (official): fp16-safe
        self.candidates = "nearest" if neighbourhood is None else "neighbourhood"
        if neighbourhood is not None:
            index, valid = neighbourhood
            self.register_buffer("cand", index, persistent=False)
            self.register_buffer("penalty", (~valid).float() * MASK_PENALTY, persistent=False)

    def _normalised(self, logits: Tensor) -> Tensor:
        if self.variant == "softmax":
            return torch.softmax(logits, dim=-1)
        w = torch.exp(logits)
        return w / w.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)

    def weights(self, z_alpha: Tensor, s_alpha: Tensor,
                dropped: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """([B, N, K] weights, [B, N, K] or [N, K] cluster indices) from clustering-time tokens and centres; for
        "official" with nearest candidates ([B, N, M] weights, zero where not kept, and [N, M] all centres).

        dropped: [B, M] penalties (0 or MASK_PENALTY) of centres no block refined, so no token is rebuilt
        from them (window clustering's padding-only clusters)."""
        if self.candidates == "neighbourhood":
            cand = take(s_alpha, self.cand)  # [B, N, J, C]
            cross = (cand @ z_alpha.unsqueeze(-1)).squeeze(-1)  # [B, N, J]
            ss = (s_alpha * s_alpha).sum(-1).index_select(1, self.cand.reshape(-1)).view_as(cross)
            dist = (z_alpha * z_alpha).sum(-1, keepdim=True) + ss - 2.0 * cross
            penalty = self.penalty if dropped is None else torch.maximum(  # one penalty value: fp16_safe_masks
                self.penalty, dropped.index_select(1, self.cand.reshape(-1)).view_as(cross))
            return self._normalised(-dist * self.inv_tau - penalty), self.cand
        logits = self._logits(z_alpha, s_alpha, dropped)
        if self.variant == "official":
            w = self._kept_at_kth(logits)
            return w, torch.arange(w.shape[-1], device=w.device).expand(w.shape[1], -1)
        top, index = torch.topk(logits, self.k, dim=-1)
        return self._normalised(top), index

    def _logits(self, z_alpha: Tensor, s_alpha: Tensor, dropped: Tensor | None) -> Tensor:
        """[B, N, M] -d^2/tau of every token to every clustering-time centre, dropped centres pushed out."""
        logits = -squared_distances(z_alpha, s_alpha) * self.inv_tau
        return logits if dropped is None else logits - dropped.unsqueeze(1)

    def _kept_at_kth(self, logits: Tensor) -> Tensor:
        """The authors' weights [B, N, M]: exp(logits), zero below the k-th largest weight (the weight, not the
        logit: exp can round distinct logits to one weight), L2-normalised."""
        w = torch.exp(logits)
        kth = torch.topk(w, self.k, dim=-1).values[..., self.k - 1:]  # [B, N, 1]
        w = torch.where(w >= kth, w, 0.0)
        return w / w.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, s_refined: Tensor, z_alpha: Tensor, s_alpha: Tensor, dropped: Tensor | None = None) -> Tensor:
        if self.candidates == "nearest" and self.variant == "official":
            w = self._kept_at_kth(self._logits(z_alpha, s_alpha, dropped))  # [B, N, M], zero where not kept
            return self.fp16_mix(w, s_refined)  # [B, N, M] @ [B, M, C]
        w, index = self.weights(z_alpha, s_alpha, dropped)
        if self.candidates == "neighbourhood":
            picked = take(s_refined, index)  # [B, N, J, C]
            return self.fp16_mix(w.unsqueeze(-2), picked).squeeze(-2)
        B, M, C = s_refined.shape
        offsets = (torch.arange(B, device=index.device) * M).view(B, 1, 1)
        picked = s_refined.reshape(B * M, C).index_select(0, (index + offsets).reshape(-1))
        return self.fp16_mix(w.unsqueeze(-2), picked.reshape(*index.shape, C)).squeeze(-2)  # [B, N, C]
