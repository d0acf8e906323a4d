"""Adapter for torchvision `VisionTransformer` classifiers, e.g. the SWAG ViT-L/16 and ViT-H/14.

torchvision runs its blocks as an nn.Sequential of EncoderBlock(input) between the positional
embedding and the final norm; the head reads the class token. Clustering wraps those blocks, the
class token rides along, and the tokens are rebuilt after the last block. Architectures come from
torchvision's constructors (never a download); checkpoints are the state dicts torchvision ships
(`vit_h_14_swag-80465313.pth`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess, check_patch_multiple
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.families.vit_common import (
    OPTIONS, OUTPUTS, TINY_ARCH, TINY_CLASSES, TINY_RESIDUAL_GAIN, TINY_SIZE, ViTClassifier, class_count, grid_side,
    read_state, require, required_arch, residual_scale, resizable, vit_of, wrap)
from hgdeploy.models.checkpoints import load_state_strict
from hgdeploy.spans.vit import insert_span

# torchvision arch -> patch size (torchvision.models.vit_*; SWAG weights exist for b_16, l_16, h_14).
TORCHVISION_ARCHS = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32, "vit_h_14": 14}
TORCHVISION_HEAD = "heads.head.weight"
TORCHVISION_POS = "encoder.pos_embedding"


def torchvision_side(input_size: tuple[int, int]) -> int:
    """torchvision's ViT takes one image_size and asserts the input is exactly image_size x image_size."""
    if input_size[0] != input_size[1]:
        raise UserError(f"torchvision_vit needs a square model.input_size (torchvision's VisionTransformer takes "
                        f"one image_size), got {input_size[0]}x{input_size[1]}")
    return input_size[0]


def random_head(vit: nn.Module) -> nn.Module:
    """torchvision zero-initialises the classifier (a fine-tuning convention): every random model would
    output all-zero logits and no check could tell a broken graph from a good one. A checkpoint
    overwrites this."""
    with torch.no_grad():
        nn.init.trunc_normal_(vit.heads.head.weight, std=0.02)
        nn.init.trunc_normal_(vit.heads.head.bias, std=0.02)
    return vit


def build_torchvision(arch: str, input_size: tuple[int, int], num_classes: int) -> nn.Module:
    """torchvision.models.<arch>(weights=None, ...) at the input size; "tiny" is the test configuration."""
    require("torchvision")
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    side = torchvision_side(input_size)
    if arch == TINY_ARCH:
        check_patch_multiple(input_size, (16, 16), "torchvision_vit")
        return random_head(VisionTransformer(image_size=side, patch_size=16, num_layers=4, num_heads=4,
                                             hidden_dim=64, mlp_dim=128, num_classes=num_classes))
    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"model.arch {arch!r} is not a torchvision ViT; use one of {', '.join(TORCHVISION_ARCHS)}")
    patch = TORCHVISION_ARCHS[arch]
    check_patch_multiple(input_size, (patch, patch), "torchvision_vit")
    return random_head(getattr(torchvision.models, arch)(weights=None, image_size=side, num_classes=num_classes))


def fit_torchvision_pos_embed(state: dict[str, Tensor], vit: nn.Module, source: str) -> dict[str, Tensor]:
    """Interpolate the checkpoint's positional embedding to the model's grid with torchvision's function."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    old, new = state.get(TORCHVISION_POS), vit.encoder.pos_embedding
    if not isinstance(old, Tensor) or not resizable(old, new, 1):
        return state
    side = vit.image_size // vit.patch_size
    grid_side(old.shape[1] - 1, TORCHVISION_POS, source, (side, side))
    return dict(interpolate_embeddings(vit.image_size, vit.patch_size, dict(state), interpolation_mode="bicubic"))


def load_torchvision(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> ViTClassifier:
    """A torchvision ViT classifier; random weights seeded with 0 when there is no checkpoint."""
    arch = required_arch(options, "torchvision_vit", ", ".join(TORCHVISION_ARCHS))
    torchvision_side(input_size)
    state, source = read_state(checkpoint) if checkpoint else (None, "")
    num_classes = class_count(options, state, TORCHVISION_HEAD, source)
    torch.manual_seed(0)
    vit = build_torchvision(arch, input_size, num_classes)
    if state is not None:
        load_state_strict(vit, fit_torchvision_pos_embed(state, vit, source), source)
    return wrap(vit, "torchvision", input_size, arch, num_classes)


def write_torchvision(model: nn.Module, folder: Path) -> Path:
    """torchvision's layout: torch.save(state_dict) as <arch>.pth (like vit_h_14_swag-80465313.pth)."""
    vit = vit_of(model, "torchvision", "torchvision_vit")
    path = Path(folder) / f"{model.hgdeploy_options['arch']}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), str(path))
    return path


def patch_torchvision(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    """Blocks alpha..reconstruct_after-1 run on clusters; the class token rides along.

    Encoder.forward adds the positional embedding and dropout before `layers` and the norm after,
    so only the Sequential of EncoderBlock(input) is replaced.
    """
    encoder = vit_of(model, "torchvision", "torchvision_vit").encoder
    encoder.layers = nn.Sequential(*insert_span(encoder.layers, plan, num_prefix_tokens=1))
    return model


def torchvision_facts(model: nn.Module) -> ModelFacts:
    """SWAG's evaluation transform: bicubic resize, ImageNet mean/std (torchvision's SWAG weights)."""
    vit = vit_of(model, "torchvision", "torchvision_vit")
    side = vit.image_size // vit.patch_size
    return ModelFacts(token_grid=(side, side), depth=len(vit.encoder.layers),
                      preprocess=Preprocess(model.input_size, "bicubic"))


def tiny_torchvision() -> tuple[ViTClassifier, tuple[int, int]]:
    """4 layers, width 64, 4x4 tokens at 64x64: the reserved arch "tiny" (load() rebuilds it)."""
    torch.manual_seed(0)
    vit = build_torchvision(TINY_ARCH, TINY_SIZE, TINY_CLASSES)
    branch_outputs = [m for layer in vit.encoder.layers for m in (layer.self_attention.out_proj, layer.mlp[3])]
    residual_scale([vit.conv_proj, vit.class_token, vit.encoder.pos_embedding, *branch_outputs], TINY_RESIDUAL_GAIN)
    return wrap(vit, "torchvision", TINY_SIZE, TINY_ARCH, TINY_CLASSES), TINY_SIZE


FAMILY = Family(
    name="torchvision_vit",
    summary="torchvision VisionTransformer classifier, e.g. SWAG ViT-L/16, ViT-H/14 (model.arch = vit_h_14, ...)",
    outputs=OUTPUTS, options=OPTIONS,
    load=load_torchvision, patch=patch_torchvision, facts=torchvision_facts,
    tiny=tiny_torchvision, write_checkpoint=write_torchvision)
