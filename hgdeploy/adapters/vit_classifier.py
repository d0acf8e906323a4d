"""Adapters for plain ViT classifiers: timm `VisionTransformer` and torchvision `VisionTransformer`.

Both libraries run their blocks as an nn.Sequential called block(x), then a final norm, then a
head that reads the class token (or pools the patch tokens). So clustering wraps the model's own
blocks, the prefix tokens (class token, timm's register tokens) ride along with the clusters, and
the tokens are rebuilt after the last block, before the final norm: the head is untouched.

Architectures come from the libraries' own constructors (never a hub download); checkpoints are
the state dicts users have (torchvision's `vit_h_14_swag-80465313.pth`, timm's `model.safetensors`).
The reserved arch "tiny" names the small test configuration of each family (see `tiny_timm`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hgdeploy.adapters.checkpoints import (
    load_state_strict,
    read_weights,
    state_dict_from,
)
from hgdeploy.adapters.registry import Family, register
from hgdeploy.adapters.span import insert_span
from hgdeploy.errors import UserError
from hgdeploy.plan import ClusterPlan
from hgdeploy.recipe import RESIZE_MODES, Preprocess

TINY_ARCH = "tiny"  # reserved: 4 layers, width 64, 4 heads, patch 16; only for tests and CI
TINY_SIZE = (64, 64)
TINY_CLASSES = 10
# Trained ViTs carry residual streams with norms in the tens to hundreds (the plan's default tau is
# set for those); a std-0.02 random init gives norms ~3. The tiny models are rescaled by this gain
# (see `residual_scale`) so clustering sees the distances of a trained model.
TINY_RESIDUAL_GAIN = 32.0
DEFAULT_CLASSES = 1000  # ImageNet-1k, when neither the recipe nor a checkpoint says otherwise
# torchvision arch -> patch size (torchvision.models.vit_*; SWAG weights exist for b_16, l_16, h_14).
TORCHVISION_ARCHS = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32, "vit_h_14": 14}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Training scripts nest the state dict: timm's train.py under "state_dict", DeiT/MAE under "model".
NESTING_KEYS = ("state_dict", "model")
TIMM_FILE = "model.safetensors"
TIMM_HEAD = "head.weight"
TORCHVISION_HEAD = "heads.head.weight"
TORCHVISION_POS = "encoder.pos_embedding"


class ViTClassifier(nn.Module):
    """pixel_values [B, 3, H, W] -> (logits [B, K],): a timm or torchvision ViT as a one-output model.

    `hgdeploy_options` holds the [model] options that rebuild this architecture with `load`.
    """

    def __init__(self, vit: nn.Module, library: str, input_size: tuple[int, int], options: dict[str, Any]):
        super().__init__()
        self.vit = vit
        self.library = library
        self.input_size = input_size
        self.hgdeploy_options = dict(options)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        return (self.vit(pixel_values),)


# ---------------------------------------------------------------- shared: options, checkpoints


def required_arch(options: dict[str, Any], family: str, choices: str) -> str:
    """A state dict does not say which architecture it belongs to: the recipe must."""
    arch = options.get("arch")
    if not arch:
        raise UserError(f"family {family} needs model.arch (the architecture the checkpoint was saved from): {choices}")
    return arch


def read_state(path: str) -> tuple[dict[str, Tensor], str]:
    """(state dict, file name for messages) from a flat or nested ("state_dict"/"model") weights file."""
    obj = read_weights(path)
    source = Path(path).name
    flat = isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
    return dict(obj) if flat else dict(state_dict_from(obj, source, NESTING_KEYS)), source


def class_count(options: dict[str, Any], state: dict[str, Tensor] | None, head_key: str, source: str) -> int:
    """model.num_classes, else the checkpoint's head size, else ImageNet-1k's 1000."""
    given = options.get("num_classes")
    if given is not None and given < 1:
        raise UserError(f"model.num_classes={given} must be at least 1 (these families output class logits)")
    head = state.get(head_key) if state else None
    found = int(head.shape[0]) if isinstance(head, Tensor) and head.ndim == 2 else None
    if given is not None and found is not None and given != found:
        raise UserError(f"{source} has a {found}-class head ({head_key}) but model.num_classes = {given}; "
                        f"set model.num_classes = {found} or remove it")
    return given or found or DEFAULT_CLASSES


def check_patch_multiple(input_size: tuple[int, int], patch: tuple[int, int], family: str) -> None:
    if input_size[0] % patch[0] or input_size[1] % patch[1]:
        raise UserError(f"{family}: model.input_size {input_size[0]}x{input_size[1]} must be a multiple of the "
                        f"patch size {patch[0]}x{patch[1]}")


def grid_side(tokens: int, key: str, source: str, target: tuple[int, int]) -> int:
    """Side of the square grid a checkpoint's positional embedding was trained on."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"{source}: {key} holds {tokens} grid positions, not a square grid; it cannot be resized to "
                        f"{target[0]}x{target[1]} (was it saved from this architecture?)")
    return side


def resizable(old: Tensor, new: Tensor, prefix: int) -> bool:
    """Same embedding width and layout, only the number of positions differs: a different input size."""
    return (old.ndim == 3 and old.shape[0] == 1 and old.shape[2] == new.shape[2] and old.shape[1] > prefix
            and old.shape != new.shape)


def vit_of(model: nn.Module, library: str, family: str) -> nn.Module:
    if not isinstance(model, ViTClassifier) or model.library != library:
        raise UserError(f"the {family} adapter expects a model loaded by family {family}, got {type(model).__name__}")
    return model.vit


def residual_scale(parts: list[nn.Module | Tensor], gain: float) -> None:
    """Multiply everything written into the residual stream (embeddings, each branch's output layer) by gain.

    An exact reparametrisation of a pre-norm ViT: every block reads the stream through a LayerNorm,
    which ignores the scale, and the final norm removes it, so the logits do not change (up to the
    norms' eps) while the hidden states, and so the clustering distances, grow by gain.
    """
    with torch.no_grad():
        for part in parts:
            for tensor in part.parameters() if isinstance(part, nn.Module) else (part,):
                tensor.mul_(gain)


def wrap(vit: nn.Module, library: str, input_size: tuple[int, int], arch: str, num_classes: int) -> ViTClassifier:
    return ViTClassifier(vit, library, input_size, {"arch": arch, "num_classes": num_classes}).eval()


def require(module: str) -> None:
    """timm and torchvision are an optional extra: say how to get them instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"the {module} package is not installed; run: pip install 'hgdeploy[vit]'")


# ---------------------------------------------------------------- timm


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


def load_timm(checkpoint: str | None, input_size: tuple[int, int], options: dict[str, Any]) -> ViTClassifier:
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


def timm_token_grid(model: nn.Module) -> tuple[int, int]:
    return tuple(vit_of(model, "timm", "timm_vit").patch_embed.grid_size)


def timm_depth(model: nn.Module) -> int:
    return len(vit_of(model, "timm", "timm_vit").blocks)


def patch_timm(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    """Blocks alpha..reconstruct_after-1 run on clusters; the prefix tokens ride along.

    timm's blocks take (x, attn_mask=None), but forward_features calls the nn.Sequential with x
    alone (no mask for classification), so the span calls them as block(x).
    """
    vit = vit_of(model, "timm", "timm_vit")
    vit.blocks = nn.Sequential(*insert_span(vit.blocks, plan, num_prefix_tokens=vit.num_prefix_tokens, mask_arg=False))
    return model


def timm_preprocess(model: nn.Module, size: tuple[int, int]) -> Preprocess:
    """The normalisation the weights were trained with, from timm's pretrained_cfg of the arch."""
    cfg = getattr(vit_of(model, "timm", "timm_vit"), "pretrained_cfg", None) or {}
    resize = cfg.get("interpolation", "bicubic")
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Preprocess(size, resize if resize in RESIZE_MODES else "bicubic",
                      tuple(float(v) for v in mean), tuple(float(v) for v in std))


def tiny_timm() -> tuple[ViTClassifier, tuple[int, int]]:
    """4 blocks, width 64, 4x4 tokens at 64x64: the reserved arch "tiny" (load() rebuilds it)."""
    torch.manual_seed(0)
    vit = build_timm(TINY_ARCH, TINY_SIZE, TINY_CLASSES)
    branch_outputs = [m for b in vit.blocks for m in (b.attn.proj, b.mlp.fc2)]
    residual_scale([vit.patch_embed.proj, vit.cls_token, vit.pos_embed, *branch_outputs], TINY_RESIDUAL_GAIN)
    return wrap(vit, "timm", TINY_SIZE, TINY_ARCH, TINY_CLASSES), TINY_SIZE


# ---------------------------------------------------------------- torchvision


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


def load_torchvision(checkpoint: str | None, input_size: tuple[int, int], options: dict[str, Any]) -> ViTClassifier:
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


def torchvision_token_grid(model: nn.Module) -> tuple[int, int]:
    vit = vit_of(model, "torchvision", "torchvision_vit")
    side = vit.image_size // vit.patch_size
    return (side, side)


def torchvision_depth(model: nn.Module) -> int:
    return len(vit_of(model, "torchvision", "torchvision_vit").encoder.layers)


def patch_torchvision(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    """Blocks alpha..reconstruct_after-1 run on clusters; the class token rides along.

    Encoder.forward adds the positional embedding and dropout before `layers` and the norm after,
    so only the Sequential of EncoderBlock(input) is replaced.
    """
    encoder = vit_of(model, "torchvision", "torchvision_vit").encoder
    encoder.layers = nn.Sequential(*insert_span(encoder.layers, plan, num_prefix_tokens=1, mask_arg=False))
    return model


def torchvision_preprocess(model: nn.Module, size: tuple[int, int]) -> Preprocess:
    """SWAG's evaluation transform: bicubic resize, ImageNet mean/std (torchvision's SWAG weights)."""
    return Preprocess(size, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


def tiny_torchvision() -> tuple[ViTClassifier, tuple[int, int]]:
    """4 layers, width 64, 4x4 tokens at 64x64: the reserved arch "tiny" (load() rebuilds it)."""
    torch.manual_seed(0)
    vit = build_torchvision(TINY_ARCH, TINY_SIZE, TINY_CLASSES)
    branch_outputs = [m for layer in vit.encoder.layers for m in (layer.self_attention.out_proj, layer.mlp[3])]
    residual_scale([vit.conv_proj, vit.class_token, vit.encoder.pos_embedding, *branch_outputs], TINY_RESIDUAL_GAIN)
    return wrap(vit, "torchvision", TINY_SIZE, TINY_ARCH, TINY_CLASSES), TINY_SIZE


# ---------------------------------------------------------------- records

OUTPUTS = (("logits", "classification"),)

TIMM_VIT = register(Family(
    name="timm_vit",
    summary="timm VisionTransformer classifier (model.arch = a timm vit_* name; timm state dict checkpoint)",
    outputs=OUTPUTS,
    load=load_timm,
    patch=patch_timm,
    token_grid=timm_token_grid,
    depth=timm_depth,
    tiny=tiny_timm,
    write_checkpoint=write_timm,
    options=("arch", "num_classes"),
    preprocess=timm_preprocess,
))

TORCHVISION_VIT = register(Family(
    name="torchvision_vit",
    summary="torchvision VisionTransformer classifier, e.g. SWAG ViT-L/16, ViT-H/14 (model.arch = vit_h_14, ...)",
    outputs=OUTPUTS,
    load=load_torchvision,
    patch=patch_torchvision,
    token_grid=torchvision_token_grid,
    depth=torchvision_depth,
    tiny=tiny_torchvision,
    write_checkpoint=write_torchvision,
    options=("arch", "num_classes"),
    preprocess=torchvision_preprocess,
))
