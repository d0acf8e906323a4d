"""Model-agnostic modules an adapter inserts around a model's own transformer blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hgdeploy.core.plan import ClusterPlan
from hgdeploy.layers import BilinearUpsampling, TokenClustering, TokenPooling, TokenReconstruction, neighbour_table
from hgdeploy.models.blocks import BlockCall, inspect_block


class Passthrough(nn.Module):
    """Stands where a block moved into a ClusteredSpan, so layer indices stay where they were."""

    def __init__(self, call: BlockCall = BlockCall()):
        super().__init__()
        self.call = call

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.call.answer(hidden_states)


class ClusteredSpan(nn.Module):
    """cluster -> the model's own blocks on cluster tokens -> (head on the clusters) -> reconstruct.

    [B, P + N, C] -> [B, P + N, C], where the first P prefix tokens (class token, registers) ride along
    with the clusters unchanged in number. With a `head`, the span ends in it instead: head([B, P + M, C])
    -> [B, M, K] per-cluster outputs (e.g. class logits), and the span returns their per-token
    reconstruction [B, N, K]. Holds no state between calls; extra arguments from the model's loop
    (masks, flags) are not passed on.
    """

    def __init__(self, blocks: list[nn.Module], plan: ClusterPlan, num_prefix_tokens: int,
                 call: BlockCall = BlockCall(), head: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.call = call
        self.head = head
        if plan.method == "pool_bilinear":
            self.clustering: nn.Module = TokenPooling(plan.token_grid, plan.grid)
            self.reconstruction: nn.Module = BilinearUpsampling(plan.token_grid, plan.grid)
        else:
            self.clustering = TokenClustering(plan.token_grid, plan.grid, plan.neighbours, plan.iters, plan.tau,
                                              plan.form, plan.device, official=plan.official)
            self.reconstruction = reconstruction_for(plan)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        p = self.num_prefix_tokens
        prefix, z_alpha = hidden_states[:, :p], hidden_states[:, p:]
        s_alpha = self.clustering(z_alpha)
        h = torch_cat(prefix, s_alpha)
        for block in self.blocks:
            h = self.call.hidden(block(h))
        if self.head is not None:
            return self.reconstruction(self.head(h), z_alpha, s_alpha)
        prefix, s_refined = h[:, :p], h[:, p:]
        return self.call.answer(torch_cat(prefix, self.reconstruction(s_refined, z_alpha, s_alpha)))


def reconstruction_for(plan: ClusterPlan) -> TokenReconstruction:
    """The reconstruction layer the plan asks for (its candidates: nearest centres or the neighbourhood, its
    cells the authors' with an official plan)."""
    cells = (neighbour_table(plan.token_grid, plan.grid, plan.neighbours, plan.official)
             if plan.reconstruct_from == "neighbourhood" else None)
    return TokenReconstruction(plan.k, plan.tau, plan.reconstruction, cells)


def torch_cat(prefix: Tensor, tokens: Tensor) -> Tensor:
    """Concatenate along tokens, skipping an empty prefix (keeps the graph free of empty Concats)."""
    return tokens if prefix.shape[1] == 0 else torch.cat([prefix, tokens], dim=1)


def insert_span(layers: nn.ModuleList | nn.Sequential, plan: ClusterPlan, num_prefix_tokens: int) -> nn.ModuleList:
    """New layer list: blocks alpha..reconstruct_after-1 run inside one ClusteredSpan.

    The span sits at index alpha (its clustering happens after alpha layers, and its modules are named
    so); the other indices it absorbed hold Passthrough modules, so the list keeps its length and the
    hidden state after every index from the span on is the reconstructed one (a loop recording states
    per layer count sees it at reconstruct_after). How the blocks are called is read from the first one
    (`inspect_block`).
    """
    if len(layers) != plan.depth:
        raise ValueError(f"plan is for {plan.depth} layers, the model has {len(layers)}")
    a, r = plan.alpha, plan.reconstruct_after
    call = inspect_block(layers[0])
    span = ClusteredSpan([layers[i] for i in range(a, r)], plan, num_prefix_tokens, call)
    new: list[nn.Module] = (list(layers[:a]) + [span] + [Passthrough(call) for _ in range(a + 1, r)]
                            + list(layers[r:]))
    return nn.ModuleList(new)
