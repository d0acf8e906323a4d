"""Mask2Former with a Swin backbone (transformers' Mask2FormerForUniversalSegmentation): window token clustering
in one Swin stage, as the authors' Expedit-Mask2Former (hourglass_swin.py) places it.

Plans count blocks over the whole backbone (Swin-L: 2 + 2 + 18 + 2), as the paper does; cluster.grid is the
clustered window k x k (the model's window K x K is the plan's token grid). Mask2Former's pixel decoder reads
every stage's output, so reconstruction defaults to the end of the clustering stage, before its patch merging
(the authors' choice). Outputs: class logits, mask logits and the semantic map.
"""

from __future__ import annotations

from typing import Any

from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.models import hf_folder
from hgdeploy.models.hf_windowed import Mask2FormerSemantic, randomised
from hgdeploy.spans.swin import patch_model, stage_facts

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _swin_l(**extra: Any) -> dict[str, Any]:
    """Swin-L (IN-22k, 384, window 12) as Mask2Former's Swin-L configs build it (EMBED_DIM 192, DEPTHS 2 2 18 2,
    NUM_HEADS 6 12 24 48, WINDOW_SIZE 12; facebook/mask2former-swin-large-* config.json)."""
    from transformers import SwinConfig

    return SwinConfig(image_size=384, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                      drop_path_rate=0.3, out_features=STAGES, **extra)


# model.arch -> Mask2FormerConfig keyword arguments (its defaults are the published models' decoder: 256 wide,
# 6 deformable encoder layers, 10 decoder layers, 100 queries).
ARCHS = {
    # facebook/mask2former-swin-large-ade-semantic: ADE20K, 150 classes, 640 x 640 crops
    "swin-large-ade-semantic": lambda: {"backbone_config": _swin_l(), "num_labels": 150},
}


def _tiny_config() -> dict[str, Any]:
    """Swin 16 wide (depths 2 2 2 2, window 5: 64 pixels give stage maps 16, 8, 4, 2, so stage 1 pads to 20)."""
    from transformers import SwinConfig

    swin = SwinConfig(image_size=64, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=5,
                      drop_path_rate=0.0, out_features=STAGES)
    return {"backbone_config": swin, "num_labels": 5, "num_queries": 8, "hidden_dim": 32, "mask_feature_size": 32,
            "feature_size": 32, "encoder_layers": 1, "decoder_layers": 2, "dim_feedforward": 64,
            "num_attention_heads": 2, "encoder_feedforward_dim": 64}


def _classes() -> tuple[Any, Any]:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    return Mask2FormerConfig, Mask2FormerForUniversalSegmentation


def _check(config: Any) -> Any:
    backbone = config.backbone_config
    if backbone is None or backbone.model_type != "swin":
        kind = None if backbone is None else backbone.model_type
        raise UserError(f"Mask2Former with a {kind} backbone is not supported: the mask2former family clusters "
                        f"windows of a Swin backbone")
    return config


def _fingerprint(config: Any) -> hf_folder.Fingerprint:
    b = config.backbone_config
    return {"embed_dim": b.embed_dim, "depths": list(b.depths), "window_size": b.window_size}


def load(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> Mask2FormerSemantic:
    config_class, model_class = _classes()
    hf = hf_folder.load_or_build("mask2former", checkpoint, options, ARCHS, "mask2former", config_class, model_class,
                                 _check, _fingerprint)
    return Mask2FormerSemantic(hf, input_size).eval()


def classes(checkpoint: str | None, options: Section) -> int | None:
    """The semantic map's classes: num_labels of the checkpoint's config.json, else of model.arch (no weights);
    None without either (loading then names what is missing)."""
    if checkpoint:
        folder = hf_folder.checkpoint_folder(checkpoint)
        return int(hf_folder.read_config(folder, "mask2former", _classes()[0], "mask2former").num_labels)
    arch = options.get("arch")
    return int(ARCHS[arch]()["num_labels"]) if arch in ARCHS else None


def tiny() -> tuple[Mask2FormerSemantic, tuple[int, int]]:
    config_class, model_class = _classes()
    return Mask2FormerSemantic(randomised(model_class(config_class(**_tiny_config()))), (64, 64)).eval(), (64, 64)


FAMILY = Family(
    name="mask2former", summary="Mask2Former with a Swin backbone (transformers Mask2FormerForUniversalSegmentation): "
                                "window clustering in one Swin stage; save_pretrained folder",
    outputs=(("class_logits", "classification"), ("mask_logits", "features"), ("semantic", "segmentation")),
    load=load, patch=lambda model, plan: patch_model(model, plan, Mask2FormerSemantic, "mask2former"),
    facts=lambda model: stage_facts(model, "bilinear"), tiny=tiny, write_checkpoint=hf_folder.write_checkpoint,
    options=("arch",), tunable=False, parts=(("backbone", "hf.model.pixel_level_module.encoder"),), classes=classes,
)
