"""Window token clustering inside one stage of transformers' Swin (the backbone of Mask2Former's Swin-L).

Blocks `alpha..after-1` of the stage run inside a `SwinWindowSpan`: the stage's H x W map is clustered per
K x K window to k x k (layers.WindowTokenClustering), those blocks run on the clustered map with window k
(shift k // 2 where the block shifted), and each window's K x K tokens are rebuilt before the stage's
remaining blocks and its patch merging, so every later shape is the unpatched one. The blocks are copies
re-fitted at patch time (window, shift, a bias table resized bilinearly with its index), never at the first
forward as the authors do: the export sees constants. The shift follows the new window (k // 2); the
authors' Mask2Former copy keeps the old shift with the new mask, which we do not reproduce.

Written against transformers' current Swin layout (SwinRelativePositionBias) and its SwinV2 layers (continuous
position bias: the coordinate table is rebuilt for the clustered window); the families that load Mask2Former
and SwinV2 checkpoints build on it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.layers import TokenReconstruction, WindowTokenClustering, WindowTokenReconstruction, neighbour_table
from hgdeploy.spans.window_attention import (
    relative_position_index,
    resize_bias_table,
    shallow_copy,
    swinv2_coords_table,
)


def refit_layer(layer: nn.Module, window: int, new_window: int, clustered_size: tuple[int, int]) -> nn.Module:
    """A copy of a Swin or SwinV2 layer for k x k windows, its weights shared: Swin's bias table resized and
    its index rebuilt, or SwinV2's coordinate table and index rebuilt (its bias MLP is shared); no shift when
    the clustered map is a single window, as Swin itself does for a map no larger than its window."""
    new = shallow_copy(layer)
    attention = shallow_copy(layer.attention)
    if hasattr(attention, "relative_position_bias"):  # Swin, transformers 5.2x
        bias = shallow_copy(layer.attention.relative_position_bias)
        table = layer.attention.relative_position_bias.relative_position_bias_table
        bias.relative_position_bias_table = nn.Parameter(resize_bias_table(table.detach(), window, new_window),
                                                         requires_grad=False)
        bias.relative_position_index = relative_position_index(new_window).view(-1)
        bias.window_size = (new_window, new_window)
        bias.window_area = new_window * new_window
        attention.relative_position_bias = bias
    elif hasattr(getattr(attention, "self", None), "relative_coords_table"):  # SwinV2
        inner = shallow_copy(layer.attention.self)
        pretrained = inner.pretrained_window_size[0]
        inner.relative_coords_table = swinv2_coords_table(window, new_window, pretrained).to(
            layer.attention.self.relative_coords_table.dtype)
        inner.relative_position_index = relative_position_index(new_window)
        inner.window_size = (new_window, new_window)
        attention.self = inner
    else:
        raise ValueError(f"{type(layer).__name__}: not a Swin or SwinV2 layer of a supported transformers layout")
    new.attention = attention
    new.window_size = new_window
    new.shift_size = new_window // 2 if layer.shift_size > 0 and min(clustered_size) > new_window else 0
    return new


def window_layers(size: tuple[int, int], window: int, cluster_window: int, neighbours: int, iters: int, tau: float,
                  k: int, reconstruct_from: str, form: str, device: str,
                  reconstruction: str) -> tuple[WindowTokenClustering, WindowTokenReconstruction]:
    """The clustering and reconstruction pair of a window span (Swin's or SAM's); reconstruction "official" also
    gives the clustering the authors' M-step and cells (`TokenClustering`)."""
    official = reconstruction == "official"
    clustering = WindowTokenClustering(size, window, cluster_window, neighbours, iters, tau, form, device, official)
    cells = (neighbour_table((window, window), (cluster_window, cluster_window), neighbours, official)
             if reconstruct_from == "neighbourhood" else None)
    return clustering, WindowTokenReconstruction(clustering, TokenReconstruction(k, tau, reconstruction, cells))


def window_options(plan: ClusterPlan, family: str) -> dict[str, Any]:
    """A plan's values as a window span takes them; refuses what windows do not support. plan.token_grid is
    the model's window (K, K) and plan.grid the clustered window (k, k)."""
    if plan.grid[0] != plan.grid[1]:
        raise UserError(f"{family}: cluster.grid {plan.grid[0]}x{plan.grid[1]} must be square, the clustered window "
                        f"(e.g. {plan.grid[0]}x{plan.grid[0]})")
    if plan.method != "cluster":
        raise UserError(f"{family}: cluster.method={plan.method!r} is for plain ViTs; windows cluster only")
    return {"neighbours": plan.neighbours, "iters": plan.iters, "tau": plan.tau, "k": plan.k,
            "reconstruct_from": plan.reconstruct_from, "form": plan.form, "device": plan.device,
            "reconstruction": plan.reconstruction}


class SwinWindowSpan(nn.Module):
    """cluster per window -> the stage's blocks on k x k windows -> rebuild each window; stands in the stage's
    block list and answers like a SwinLayer: (hidden_states [B, H * W, C], attention weights None)."""

    def __init__(self, layers: list[nn.Module], size: tuple[int, int], window: int, cluster_window: int,
                 neighbours: int, iters: int, tau: float, k: int, reconstruct_from: str = "nearest",
                 form: str = "auto", device: str = "cpu", reconstruction: str = "softmax"):
        super().__init__()
        self.size = tuple(size)
        self.clustering, self.reconstruction = window_layers(size, window, cluster_window, neighbours, iters, tau, k,
                                                             reconstruct_from, form, device, reconstruction)
        if min(size) <= window:
            raise ValueError(f"a {size[0]}x{size[1]} map is at most one {window}x{window} window: Swin attends to it "
                             f"whole, there are no windows to cluster")
        self.blocks = nn.ModuleList([refit_layer(b, window, cluster_window, self.clustering.clustered_size)
                                     for b in layers])
        # Swin's layers re-clamp their window to the map unless told not to; SwinV2's fix it at build time.
        takes = inspect.signature(layers[0].forward).parameters
        self.call_kwargs = {"always_partition": True} if "always_partition" in takes else {}

    def forward(self, hidden_states: Tensor, input_dimensions: tuple[int, int], *args: Any,
                **kwargs: Any) -> tuple[Tensor, None]:
        B, _, C = hidden_states.shape
        H, W = self.size
        clusters, z, s = self.clustering(hidden_states.view(B, H, W, C))
        h, w = self.clustering.clustered_size
        x = clusters.reshape(B, h * w, C)
        for block in self.blocks:
            x = block(x, (h, w), **self.call_kwargs)[0]
        rebuilt = self.reconstruction(x.view(B, h, w, C), z, s)
        return rebuilt.reshape(B, H * W, C), None


class SwinPassthrough(nn.Module):
    """Stands where a block moved into the span: the stage's loop keeps its length."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return hidden_states, None


def insert_window_span(stage: nn.Module, size: tuple[int, int], alpha: int, after: int, cluster_window: int,
                       **options: Any) -> nn.Module:
    """Blocks alpha..after-1 of `stage` (0-based within the stage) run clustered; `size` is the stage's map."""
    blocks = list(stage.blocks)
    window = int(blocks[0].window_size)
    span = SwinWindowSpan(blocks[alpha:after], size, window, cluster_window, **options)
    stage.blocks = nn.ModuleList(blocks[:alpha] + [span] + [SwinPassthrough() for _ in range(alpha + 1, after)]
                                 + blocks[after:])
    return stage


def stage_blocks(depths: tuple[int, ...], alpha: int, after: int) -> tuple[int, int, int]:
    """(stage, first block, end block) within the stage (0-based) for a plan counted over the whole network, as the
    paper counts it (SwinV2-L: alpha 12, alpha + beta 22 over depths 2, 2, 18, 2 -> stage 2, blocks 8..18).
    Clustering and reconstruction must lie in one stage: patch merging between them would see clusters."""
    start = 0
    for stage, depth in enumerate(depths):
        if start <= alpha < start + depth:
            if not alpha < after <= start + depth:
                raise UserError(f"clustering after block {alpha} lies in stage {stage + 1} (blocks {start + 1}.."
                                 f"{start + depth}); reconstruct at most after block {start + depth}, before its "
                                 f"patch merging")
            return stage, alpha - start, after - start
        start += depth
    raise UserError(f"cluster.alpha={alpha} is beyond the network's {start} blocks")


def stage_size(input_size: tuple[int, int], patch: int, stage: int) -> tuple[int, int]:
    """The token map of a stage: Swin pads the image to whole patches and every merging to even sides."""
    h, w = -(-input_size[0] // patch), -(-input_size[1] // patch)
    for _ in range(stage):
        h, w = -(-h // 2), -(-w // 2)
    return (h, w)


def patch_stages(stages: Any, depths: tuple[int, ...], patch: int, input_size: tuple[int, int], plan: ClusterPlan,
                 family: str) -> None:
    """Insert the window span a plan asks for into the stage it falls in (a Swin or SwinV2 encoder's stages)."""
    options = window_options(plan, family)
    stage, first, end = stage_blocks(depths, plan.alpha, plan.reconstruct_after)
    size = stage_size(input_size, patch, stage)
    window = int(stages[stage].blocks[0].window_size)
    if min(size) <= window:
        raise UserError(f"{family}: stage {stage + 1} is a {size[0]}x{size[1]} map, at most one {window}x{window} "
                        f"window: nothing to cluster; use a larger model.input_size or cluster in an earlier stage")
    insert_window_span(stages[stage], size, first, end, plan.grid[0], **options)


def stage_facts(model: nn.Module, resize: str) -> ModelFacts:
    """A Swin-backed model's facts (model.backbone_config, model.input_size): the window is the plan's token grid,
    blocks count over every stage, and a head reads every stage's end."""
    c = model.backbone_config
    ends = tuple(sum(c.depths[: i + 1]) for i in range(len(c.depths)))
    return ModelFacts(token_grid=(c.window_size, c.window_size), depth=sum(c.depths),
                      preprocess=Preprocess(model.input_size, resize), head_reads=ends)


def patch_model(model: nn.Module, plan: ClusterPlan, wrapper: type, family: str) -> nn.Module:
    """Patch a Swin-backed model the family loaded (a `wrapper` with backbone_config, stages and input_size)."""
    if not isinstance(model, wrapper):
        raise UserError(f"the {family} adapter patches models it loaded, got {type(model).__name__}")
    c = model.backbone_config
    patch_stages(model.stages, tuple(c.depths), c.patch_size, model.input_size, plan, family)
    return model
