"""Window token clustering in transformers' SAM vision encoder (ViT-H: 14 x 14 windows and four global layers).

As the authors' Expedit-SAM: from layer `alpha` on, the 64 x 64 map is clustered per 14 x 14 window to
k x k (zero padding to whole windows; the clusters of the padding are dropped, see layers.py), the windowed
layers run on k x k windows and the global layers attend over the whole clustered map; each window's tokens are
rebuilt after the last layer, before the neck. SAM resizes its decomposed relative positions linearly at every
forward; here each re-fitted layer gets them resized once, at patch time (2k - 1 rows for a windowed layer,
2 h' - 1 for a global one), so the forward's own resize is the identity.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hgdeploy.spans.swin import window_layers
from hgdeploy.spans.window_attention import resize_rel_pos, shallow_copy


def refit_sam_layer(layer: nn.Module, cluster_window: int, clustered_size: tuple[int, int]) -> nn.Module:
    """A copy of a SamVisionLayer for the clustered map, its weights shared: window k for a windowed layer, the
    relative positions resized for the new window (or the whole clustered map for a global layer)."""
    new = shallow_copy(layer)
    attn = shallow_copy(layer.attn)
    windowed = layer.window_size > 0
    rows, cols = (cluster_window, cluster_window) if windowed else clustered_size
    if getattr(attn, "use_rel_pos", False):
        attn.rel_pos_h = nn.Parameter(resize_rel_pos(layer.attn.rel_pos_h.detach(), 2 * rows - 1), requires_grad=False)
        attn.rel_pos_w = nn.Parameter(resize_rel_pos(layer.attn.rel_pos_w.detach(), 2 * cols - 1), requires_grad=False)
    new.attn = attn
    new.window_size = cluster_window if windowed else 0
    return new


class SamWindowSpan(nn.Module):
    """cluster per window -> the encoder's remaining layers on the clustered map -> rebuild every window; stands
    in the encoder's layer list: [B, H, W, C] -> [B, H, W, C]."""

    def __init__(self, layers: list[nn.Module], size: tuple[int, int], window: int, cluster_window: int,
                 neighbours: int, iters: int, tau: float, k: int, reconstruct_from: str = "nearest",
                 form: str = "auto", device: str = "cpu", reconstruction: str = "softmax"):
        super().__init__()
        self.clustering, self.reconstruction = window_layers(size, window, cluster_window, neighbours, iters, tau, k,
                                                             reconstruct_from, form, device, reconstruction)
        self.blocks = nn.ModuleList([refit_sam_layer(b, cluster_window, self.clustering.clustered_size)
                                     for b in layers])

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        clusters, z, s = self.clustering(hidden_states)
        for block in self.blocks:
            clusters = block(clusters)
        return self.reconstruction(clusters, z, s)


class SamPassthrough(nn.Module):
    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def insert_sam_span(encoder: nn.Module, size: tuple[int, int], alpha: int, cluster_window: int,
                    after: int | None = None, **options: Any) -> nn.Module:
    """Layers alpha..after-1 of the SAM vision encoder run clustered (after: default the last layer, before the neck,
    where the authors rebuild)."""
    layers = list(encoder.layers)
    after = len(layers) if after is None else after
    window = next(int(layer.window_size) for layer in layers if layer.window_size > 0)
    span = SamWindowSpan(layers[alpha:after], size, window, cluster_window, **options)
    encoder.layers = nn.ModuleList(layers[:alpha] + [span] + [SamPassthrough() for _ in range(alpha + 1, after)]
                                   + layers[after:])
    return encoder
