"""The constant tables the layers are built from: pooling matrices, neighbourhoods and their inverses.

Everything here runs once, at construction time, so an ONNX export sees only constants; `take` is the one
gather over such a table that runs in forward. Shapes: N = H*W tokens, M = h*w clusters, J candidates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Penalty added to the logits of clusters outside a token's neighbourhood (as the official code
# does). Finite in fp32; a graph pass makes it fp16-safe for TensorRT fp16 engines.
MASK_PENALTY = 1e16


def pooling_matrix_1d(src: int, dst: int) -> Tensor:
    """[dst, src] weights of torch's adaptive average pooling from src to dst cells.

    Cell i averages src indices floor(i*src/dst) .. ceil((i+1)*src/dst)-1, which also works when
    dst does not divide src (the case torch's ONNX export of adaptive_avg_pool2d refuses).
    """
    mat = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        start = (i * src) // dst
        end = math.ceil((i + 1) * src / dst)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def pooling_matrix(token_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """[M, N] matrix P with P @ Z == adaptive_avg_pool2d(Z seen as H x W, (h, w)) flattened."""
    ph = pooling_matrix_1d(token_grid[0], grid[0])
    pw = pooling_matrix_1d(token_grid[1], grid[1])
    return torch.kron(ph, pw).float()


def nearest_source_index(src: int, dst: int) -> Tensor:
    """[dst] index of the input each output reads in torch's nearest interpolation (mode="nearest") from src
    to dst: floor(i * scale) in float32 with scale = float32(src) / dst, capped at src - 1 (ATen's
    nearest_neighbor_compute_source_index; its shortcuts for dst == src and dst == 2 src give the same). The
    float32 product rounds below an integer on some pairs (46 -> 28: token 23 reads cell 13, not 14)."""
    scale = torch.tensor(float(src), dtype=torch.float32) / dst
    index = torch.floor(torch.arange(dst, dtype=torch.float32) * scale).long()
    return index.clamp_max(src - 1)


def own_cells(token_grid: tuple[int, int], grid: tuple[int, int], official: bool = False) -> tuple[Tensor, Tensor]:
    """Row and column of the cluster cell each token starts in ([N] each).

    Exact integer division, (i * h) // H, by default; with `official` the cell the authors give the token: their
    h x w cell-label map upsampled to H x W by torch's nearest interpolation, which rounds in float32 and moves
    one boundary token on some grid pairs (35 pairs up to 96, e.g. 44 -> 26, 46 -> 14, 46 -> 28).
    """
    H, W = token_grid
    h, w = grid
    if official:
        rows, cols = nearest_source_index(h, H), nearest_source_index(w, W)
    else:
        rows = (torch.arange(H) * h) // H
        cols = (torch.arange(W) * w) // W
    return rows.repeat_interleave(W), cols.repeat(H)


def neighbourhood_mask(token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int,
                       official: bool = False) -> Tensor:
    """[N, M] bool: True where cluster i lies in the neighbours x neighbours cells around token p's cell
    (`own_cells`, `official` as there)."""
    radius = neighbours // 2
    rows, cols = own_cells(token_grid, grid, official)
    h, w = grid
    crow = torch.arange(h).repeat_interleave(w)
    ccol = torch.arange(w).repeat(h)
    return ((rows[:, None] - crow[None, :]).abs() <= radius) & ((cols[:, None] - ccol[None, :]).abs() <= radius)


def squared_distances(z: Tensor, s: Tensor) -> Tensor:
    """[B, N, M] squared Euclidean distances between tokens z [B, N, C] and centres s [B, M, C]."""
    zz = (z * z).sum(-1, keepdim=True)
    ss = (s * s).sum(-1).unsqueeze(1)
    return zz + ss - 2.0 * torch.matmul(z, s.transpose(1, 2))


def neighbour_table(token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int,
                    official: bool = False) -> tuple[Tensor, Tensor]:
    """([N, J] cluster index, [N, J] valid) of the J = neighbours^2 cells around each token's cell (`own_cells`,
    `official` as there).

    Cells that fall off the grid point at the token's own cell and are marked invalid.
    """
    radius = neighbours // 2
    rows, cols = own_cells(token_grid, grid, official)
    h, w = grid
    offsets = torch.arange(-radius, radius + 1)
    r = rows[:, None, None] + offsets[None, :, None]
    c = cols[:, None, None] + offsets[None, None, :]
    valid = ((r >= 0) & (r < h) & (c >= 0) & (c < w)).reshape(len(rows), -1)
    index = (r.clamp(0, h - 1) * w + c.clamp(0, w - 1)).reshape(len(rows), -1)
    own = (rows * w + cols)[:, None].expand_as(index)
    return torch.where(valid, index, own), valid


def inverse_table(index: Tensor, valid: Tensor, num_clusters: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each cluster, the (token, slot) pairs that see it: ([M, T] token, [M, T] flat slot, [M, T] valid).

    T is the largest number of tokens any cluster receives; shorter lists are padded with invalid
    entries pointing at slot 0.
    """
    N, J = index.shape
    lists: list[list[int]] = [[] for _ in range(num_clusters)]
    for flat in torch.nonzero(valid.reshape(-1)).flatten().tolist():
        lists[int(index.reshape(-1)[flat])].append(flat)
    T = max(len(x) for x in lists)
    slot = torch.zeros(num_clusters, T, dtype=torch.long)
    ok = torch.zeros(num_clusters, T, dtype=torch.bool)
    for i, x in enumerate(lists):
        slot[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        ok[i, : len(x)] = True
    return slot // J, slot, ok


def sparse_rows(mat: Tensor) -> tuple[Tensor, Tensor]:
    """([R, K] column index, [R, K] weight) of the nonzeros of each row of a [R, Ncol] matrix, zero-padded."""
    K = int((mat != 0).sum(1).max())
    weight, col = torch.topk(mat.abs(), K, dim=1)
    return col, torch.gather(mat, 1, col) * (weight > 0)


def take(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] for x [B, L, C] and a constant integer index of any shape -> [B, *index.shape, C].

    A row lookup (embedding) on the flattened batch: one ONNX Gather, and the fastest row gather
    in torch eager on CPU (index_select and advanced indexing are slower there).
    """
    B, L, C = x.shape
    offsets = (torch.arange(B, device=index.device) * L).view(B, *([1] * index.dim()))
    return torch.nn.functional.embedding(index.unsqueeze(0) + offsets, x.reshape(B * L, C))

