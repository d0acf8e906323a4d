"""Window token clustering and reconstruction for windowed transformers (Swin, SAM's ViT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hgdeploy.layers.clustering import TokenClustering
from hgdeploy.layers.reconstruction import TokenReconstruction
from hgdeploy.layers.tables import MASK_PENALTY

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
    `official`: the authors' M-step and cells inside every window (`TokenClustering`).
    """

    def __init__(self, size: tuple[int, int], window: int, cluster_window: int, neighbours: int, iters: int,
                 tau: float, form: str = "auto", device: str = "cpu", official: bool = False):
        super().__init__()
        if not 1 <= cluster_window <= window:
            raise ValueError(f"cluster window {cluster_window} must be in 1..{window}")
        self.size, self.window, self.cluster_window = tuple(size), window, cluster_window
        self.padded = padded_size(size, window)
        self.inner = TokenClustering((window, window), (cluster_window, cluster_window), neighbours, iters, tau, form,
                                     device, official)
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
