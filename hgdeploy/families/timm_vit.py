"""Adapter for timm `VisionTransformer` classifiers (model.arch = a timm vit_* name).

timm runs its blocks as an nn.Sequential called block(x), then a final norm, then a head that
reads the class token (or pools the patch tokens). So clustering wraps the model's own blocks, the
prefix tokens (class token, register tokens) ride along with the clusters, and the tokens are
rebuilt after the last block, before the final norm: the head is untouched. Architectures come from
timm's own constructors (never a hub download); checkpoints are timm's state dicts (model.safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, Preprocess, check_patch_multiple
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.families.vit_common import (
    OPTIONS, OUTPUTS, TINY_ARCH, TINY_CLASSES, TINY_RESIDUAL_GAIN, TINY_SIZE, ViTClassifier, class_count, grid_side,
    read_state, require, required_arch, residual_scale, resizable, vit_of, wrap)
from hgdeploy.models.checkpoints import load_state_strict
from hgdeploy.spans.vit import insert_span

TIMM_FILE = "model.safetensors"
TIMM_HEAD = "head.weight"


def build_timm(arch: str, input_size: tuple[int, int], num_classes: int) -> nn.Module:
    """timm.create_model(arch, pretrained=False, ...) at the input size; "tiny" is the test configuration."""
    require("timm")
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if arch == TINY_ARCH:
        return VisionTransformer(img_size=input_size, patch_size=16, embed_dim=64, depth=4, num_heads=4,
                                 num_classes=num_classes)
    try:
        vit = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=input_size)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise UserError(f"model.arch {arch!r} is not a timm model name (see timm.list_models('vit_*'))") from exc
    except TypeError as exc:  # a non-ViT constructor refusing img_size
        raise UserError(f"model.arch {arch!r} is not a timm VisionTransformer: {exc}") from exc
    if not isinstance(vit, VisionTransformer):
        raise UserError(f"model.arch {arch!r} builds a timm {type(vit).__name__}; family timm_vit supports "
                        f"timm.models.vision_transformer.VisionTransformer (vit_* models)")
    return vit


def timm_patch_size(vit: nn.Module) -> tuple[int, int] | None:
    """The patch size of a plain patch embedding; None for hybrid (CNN stem) embeddings."""
    size = getattr(vit.patch_embed, "patch_size", None)
    return tuple(size) if isinstance(size, (tuple, list)) and len(size) == 2 else None


def fit_timm_pos_embed(state: dict[str, Tensor], vit: nn.Module, source: str) -> dict[str, Tensor]:
    """Resample the checkpoint's positional embedding to the model's grid with timm's own function.

    Same call and settings (bicubic, antialias) as timm's checkpoint_filter_fn; only pos_embed is
    adapted: anything else that differs is a wrong checkpoint, reported by the strict loader.
    """
    from timm.layers import resample_abs_pos_embed

    old, new = state.get("pos_embed"), vit.pos_embed
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if not isinstance(old, Tensor) or new is None or not resizable(old, new, prefix):
        return state
    grid = tuple(vit.patch_embed.grid_size)
    side = grid_side(old.shape[1] - prefix, "pos_embed", source, grid)
    resampled = resample_abs_pos_embed(old, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix,
                                       interpolation="bicubic", antialias=True)
    return {**state, "pos_embed": resampled}


def load_timm(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> ViTClassifier:
    """A timm ViT classifier; random weights seeded with 0 when there is no checkpoint."""
    arch = required_arch(options, "timm_vit", "a timm model name such as 'vit_base_patch16_384'")
    state, source = read_state(checkpoint) if checkpoint else (None, "")
    num_classes = class_count(options, state, TIMM_HEAD, source)
    torch.manual_seed(0)
    vit = build_timm(arch, input_size, num_classes)
    patch = timm_patch_size(vit)
    if patch:
        check_patch_multiple(input_size, patch, "timm_vit")
    if state is not None:
        load_state_strict(vit, fit_timm_pos_embed(state, vit, source), source)
    return wrap(vit, "timm", input_size, arch, num_classes)


def write_timm(model: nn.Module, folder: Path) -> Path:
    """timm's layout: the bare model's state dict as model.safetensors (as on the Hugging Face hub)."""
    from safetensors.torch import save_file

    vit = vit_of(model, "timm", "timm_vit")
    path = Path(folder) / TIMM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in vit.state_dict().items()}, str(path))
    return path


def patch_timm(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    """Blocks alpha..reconstruct_after-1 run on clusters; the prefix tokens ride along.

    timm's blocks take (x, attn_mask=None), but forward_features calls the nn.Sequential with x
    alone (no mask for classification), so the span calls them as block(x).
    """
    vit = vit_of(model, "timm", "timm_vit")
    vit.blocks = nn.Sequential(*insert_span(vit.blocks, plan, num_prefix_tokens=vit.num_prefix_tokens))
    return model


def timm_facts(model: nn.Module) -> ModelFacts:
    """Token grid and depth of the ViT; the normalisation the weights were trained with, from timm's
    pretrained_cfg of the arch."""
    vit = vit_of(model, "timm", "timm_vit")
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    resize = cfg.get("interpolation", "bicubic")
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = Preprocess(model.input_size, resize if resize in RESIZE_MODES else "bicubic",
                     tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return ModelFacts(token_grid=tuple(vit.patch_embed.grid_size), depth=len(vit.blocks), preprocess=pre)


def tiny_timm() -> tuple[ViTClassifier, tuple[int, int]]:
    """4 blocks, width 64, 4x4 tokens at 64x64: the reserved arch "tiny" (load() rebuilds it)."""
    torch.manual_seed(0)
    vit = build_timm(TINY_ARCH, TINY_SIZE, TINY_CLASSES)
    branch_outputs = [m for b in vit.blocks for m in (b.attn.proj, b.mlp.fc2)]
    residual_scale([vit.patch_embed.proj, vit.cls_token, vit.pos_embed, *branch_outputs], TINY_RESIDUAL_GAIN)
    return wrap(vit, "timm", TINY_SIZE, TINY_ARCH, TINY_CLASSES), TINY_SIZE


FAMILY = Family(
    name="timm_vit",
    summary="timm VisionTransformer classifier (model.arch = a timm vit_* name; timm state dict checkpoint)",
    outputs=OUTPUTS, options=OPTIONS,
    load=load_timm, patch=patch_timm, facts=timm_facts, tiny=tiny_timm, write_checkpoint=write_timm)
