"""How a photo becomes the model's input tensor, and the facts every family shares about it."""

from __future__ import annotations

from dataclasses import dataclass

from hgdeploy.core.errors import UserError

# ImageNet statistics (torchvision's, timm's IMAGENET_DEFAULT_*): most ViT weights were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the model's float32 NCHW input; recorded in every report."""

    size: tuple[int, int]
    resize: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def check_patch_multiple(input_size: tuple[int, int], patch: int | tuple[int, int], family: str = "") -> None:
    """A ViT cuts its input into whole patches: any other size is the user's to fix, with a size that works."""
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    h, w = input_size
    if h % ph or w % pw:
        where = f"{family}: " if family else ""
        size = f"{ph}" if ph == pw else f"{ph}x{pw}"
        raise UserError(f"{where}model.input_size {h}x{w} must be a multiple of the patch size {size} "
                        f"(e.g. {max(h // ph, 1) * ph}x{max(w // pw, 1) * pw})")
