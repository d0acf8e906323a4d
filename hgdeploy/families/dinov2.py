"""Adapter for Hugging Face `Dinov2Model`: clustering around the model's own `Dinov2Layer` blocks."""

from __future__ import annotations

from torch import nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan
from hgdeploy.spans.vit import insert_span


def check_dinov2(backbone: nn.Module) -> None:
    """Fail loudly on anything that is not a plain `Dinov2Model` (registers, other classes)."""
    from transformers import Dinov2Model

    if type(backbone) is not Dinov2Model:
        raise UserError(f"the dinov2 adapter supports transformers.Dinov2Model, got {type(backbone).__name__}")


def dinov2_depth(backbone: nn.Module) -> int:
    return len(backbone.encoder.layer)


def patch_dinov2(backbone: nn.Module, plan: ClusterPlan) -> None:
    """Insert clustering after `plan.alpha` blocks and reconstruction after `plan.reconstruct_after`.

    In place: callers patch a copy. The class token rides along with the cluster tokens.
    """
    check_dinov2(backbone)
    backbone.encoder.layer = insert_span(backbone.encoder.layer, plan, num_prefix_tokens=1)
