"""What the timm and torchvision ViT classifier adapters share: the wrapper, options, checkpoints, test scaling.

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

import torch
from torch import Tensor, nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import Section
from hgdeploy.models.checkpoints import read_weights, state_dict_from

TINY_ARCH = "tiny"  # reserved: 4 layers, width 64, 4 heads, patch 16; only for tests and CI
TINY_SIZE = (64, 64)
TINY_CLASSES = 10
# Trained ViTs carry residual streams with norms in the tens to hundreds (the plan's default tau is
# set for those); a std-0.02 random init gives norms ~3. The tiny models are rescaled by this gain
# (see `residual_scale`) so clustering sees the distances of a trained model.
TINY_RESIDUAL_GAIN = 32.0
DEFAULT_CLASSES = 1000  # ImageNet-1k, when neither the recipe nor a checkpoint says otherwise
# Training scripts nest the state dict: timm's train.py under "state_dict", DeiT/MAE under "model".
NESTING_KEYS = ("state_dict", "model")
OUTPUTS = (("logits", "classification"),)
OPTIONS = ("arch", "num_classes")  # the [model] keys both families take


class ViTClassifier(nn.Module):
    """pixel_values [B, 3, H, W] -> (logits [B, K],): a timm or torchvision ViT as a one-output model.

    `hgdeploy_options` holds the [model] options that rebuild this architecture with `load`.
    """

    def __init__(self, vit: nn.Module, library: str, input_size: tuple[int, int], options: Section):
        super().__init__()
        self.vit = vit
        self.library = library
        self.input_size = input_size
        self.hgdeploy_options = dict(options)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        return (self.vit(pixel_values),)


def required_arch(options: Section, family: str, choices: str) -> str:
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


def class_count(options: Section, state: dict[str, Tensor] | None, head_key: str, source: str) -> int:
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
