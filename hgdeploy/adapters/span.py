"""Model-agnostic modules an adapter inserts around a model's own transformer blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hgdeploy.layers import TokenClustering, TokenReconstruction
from hgdeploy.plan import ClusterPlan


class Passthrough(nn.Module):
    """Stands where a block moved into a ClusteredSpan, so layer indices stay where they were."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class ClusteredSpan(nn.Module):
    """cluster -> the model's own blocks on cluster tokens -> reconstruct.

    [B, P + N, C] -> [B, P + N, C], where the first P prefix tokens (class token, registers)
    ride along with the clusters unchanged in number. Holds no state between calls.
    """

    def __init__(self, blocks: list[nn.Module], plan: ClusterPlan, num_prefix_tokens: int, mask_arg: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.mask_arg = mask_arg  # the blocks take (hidden, attention_mask) (transformers) or just (hidden)
        self.clustering = TokenClustering(plan.token_grid, plan.grid, plan.neighbours, plan.iters, plan.tau, plan.form)
        self.reconstruction = TokenReconstruction(plan.k, plan.tau, plan.reconstruction)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The blocks get no attention mask: a mask over N tokens has no meaning for M clusters.

        Dense-prediction ViTs attend everywhere; some libraries still pass an all-zero mask
        (transformers does while tracing for export), which is exactly equivalent to none.
        """
        p = self.num_prefix_tokens
        prefix, z_alpha = hidden_states[:, :p], hidden_states[:, p:]
        s_alpha = self.clustering(z_alpha)
        h = torch_cat(prefix, s_alpha)
        for block in self.blocks:
            h = block(h, None, **kwargs) if self.mask_arg else block(h)
        prefix, s_refined = h[:, :p], h[:, p:]
        return torch_cat(prefix, self.reconstruction(s_refined, z_alpha, s_alpha))


def torch_cat(prefix: Tensor, tokens: Tensor) -> Tensor:
    """Concatenate along tokens, skipping an empty prefix (keeps the graph free of empty Concats)."""
    return tokens if prefix.shape[1] == 0 else torch.cat([prefix, tokens], dim=1)


def insert_span(layers: nn.ModuleList | nn.Sequential, plan: ClusterPlan, num_prefix_tokens: int,
                mask_arg: bool = True) -> nn.ModuleList:
    """New layer list: blocks alpha..reconstruct_after-1 run inside one ClusteredSpan.

    The span sits at the index of the last block it runs so the hidden state recorded after that
    index is the reconstructed one; the indices it absorbed hold Passthrough modules.
    """
    if len(layers) != plan.depth:
        raise ValueError(f"plan is for {plan.depth} layers, the model has {len(layers)}")
    a, r = plan.alpha, plan.reconstruct_after
    span = ClusteredSpan([layers[i] for i in range(a, r)], plan, num_prefix_tokens, mask_arg)
    new: list[nn.Module] = list(layers[:a]) + [Passthrough() for _ in range(a, r - 1)] + [span] + list(layers[r:])
    return nn.ModuleList(new)
