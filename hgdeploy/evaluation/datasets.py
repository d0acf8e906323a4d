"""Dataset layouts: where the images and their ground truth lie, and how the ground truth is encoded.

One small reader per layout, each a `Layout` record; a folder that does not match gets a one-line
error naming what is missing. Samples are listed up front (paths only) and read one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from hgdeploy.core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Eigen et al.'s crop of the 480 x 640 NYUv2 frame (rows 45:471, columns 41:601) and Garg et al.'s KITTI crop,
# as fractions of the frame (top, bottom, left, right), so they apply at any resolution of the same frame.
EIGEN_CROP = (45 / 480, 471 / 480, 41 / 640, 601 / 640)
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    target: Path | None  # None: images only


@dataclass(frozen=True)
class Layout:
    """A dataset layout. task: the output kind it scores ("segmentation", "depth", "heatmap"; None: images only).

    Segmentation: a stored label is class + shift; `ignore` is a stored value that is not scored (with
    shift 1, stored 0 is "other" and is ignored too). Depth: stored value / depth_scale = metres, 0 = no
    measurement; pixels outside (min_depth, max_depth) and outside `crop` are not scored, predictions
    are clipped to [min_depth, max_depth]. Saliency: a mask pixel > 127 is salient.
    """

    name: str
    task: str | None
    where: str  # the folder structure, in words
    find: Callable[[Path], list[Sample]]
    num_classes: int = 0
    ignore: int | None = None
    shift: int = 0
    depth_scale: float = 0.0
    min_depth: float = 1e-3
    max_depth: float = 0.0
    crop: tuple[float, float, float, float] | None = None
    crop_name: str = ""

    def describe(self) -> str:
        """How the ground truth is scored, in words, for the report."""
        if self.task == "segmentation":
            ignored = ([f"stored {self.ignore}"] if self.ignore is not None else []) + (
                ["stored 0 (no class)"] if self.shift else [])
            return (f"{self.num_classes} classes, class = stored label - {self.shift}; not scored: "
                    f"{', '.join(ignored) or 'nothing'}")
        if self.task == "depth":
            return (f"depth = stored / {self.depth_scale:g} m; scored where {self.min_depth:g} < depth < "
                    f"{self.max_depth:g} m inside the {self.crop_name} crop; predictions clipped to that range")
        if self.task == "heatmap":
            return "salient where the mask is > 127; saliency maps scored as 8-bit images"
        return "no ground truth: agreement with the unpatched model only"


def _need(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} not found: the {layout} layout needs {what}; pass the dataset's root folder or "
                        f"another --layout")
    return path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _paired(images: list[Path], labels: Path, suffix: str, layout: str, stem_of=lambda p: p.stem) -> list[Sample]:
    out = []
    for image in images:
        stem = stem_of(image)
        target = labels / f"{stem}{suffix}"
        if not target.is_file():
            raise UserError(f"{target} not found: every image of the {layout} layout needs its ground truth "
                            f"({image.name} has none)")
        out.append(Sample(stem, image, target))
    if not out:
        raise UserError(f"no images found for the {layout} layout (jpg/png); check the folder")
    return out


def _split(root: Path, split_file: Path, images: Path, labels: Path, layout: str) -> list[Sample]:
    if not split_file.is_file():
        raise UserError(f"{split_file} not found: the {layout} layout lists its validation images there")
    stems = [s.strip() for s in split_file.read_text().split() if s.strip()]
    found = []
    for stem in stems:
        matches = [images / f"{stem}{s}" for s in IMAGE_SUFFIXES if (images / f"{stem}{s}").is_file()]
        if not matches:
            raise UserError(f"{images / (stem + '.jpg')} not found: {split_file.name} lists {stem}")
        found.append(matches[0])
    return _paired(found, labels, ".png", layout)


def find_ade20k(root: Path) -> list[Sample]:
    images = _need(root / "images" / "validation", "images/validation/*.jpg", "ade20k")
    labels = _need(root / "annotations" / "validation", "annotations/validation/*.png", "ade20k")
    return _paired(_images(images), labels, ".png", "ade20k")


def find_cityscapes(root: Path) -> list[Sample]:
    images = _need(root / "leftImg8bit" / "val", "leftImg8bit/val/<city>/*_leftImg8bit.png", "cityscapes")
    labels = _need(root / "gtFine" / "val", "gtFine/val/<city>/*_gtFine_labelTrainIds.png", "cityscapes")
    out: list[Sample] = []
    for city in sorted(p for p in images.iterdir() if p.is_dir()):
        photos = sorted(city.glob("*_leftImg8bit.png"))
        out += _paired(photos, labels / city.name, "_gtFine_labelTrainIds.png", "cityscapes",
                       lambda p: p.name[: -len("_leftImg8bit.png")]) if photos else []
    if not out:
        raise UserError(f"no *_leftImg8bit.png images under {images}/<city>/ for the cityscapes layout")
    return out


def find_pascal_context(root: Path) -> list[Sample]:
    images = _need(root / "JPEGImages", "JPEGImages/*.jpg", "pascal_context")
    labels = _need(root / "SegmentationClassContext", "SegmentationClassContext/*.png (59 classes)", "pascal_context")
    return _split(root, root / "ImageSets" / "SegmentationContext" / "val.txt", images, labels, "pascal_context")


def find_voc(root: Path) -> list[Sample]:
    images = _need(root / "JPEGImages", "JPEGImages/*.jpg", "voc")
    labels = _need(root / "SegmentationClass", "SegmentationClass/*.png", "voc")
    return _split(root, root / "ImageSets" / "Segmentation" / "val.txt", images, labels, "voc")


def _images_and(sub: str, what: str, layout: str) -> Callable[[Path], list[Sample]]:
    def find(root: Path) -> list[Sample]:
        images = _need(root / "images", "images/*.jpg|png", layout)
        return _paired(_images(images), _need(root / sub, what, layout), ".png", layout)
    return find


def find_folder(root: Path) -> list[Sample]:
    out = [Sample(p.stem, p, None) for p in _images(root)]
    if not out:
        raise UserError(f"{root} holds no jpg/png images (the folder layout reads the images directly in it)")
    return out


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("ade20k", "segmentation", "images/validation/*.jpg + annotations/validation/*.png", find_ade20k,
           num_classes=150, shift=1),
    Layout("cityscapes", "segmentation", "leftImg8bit/val/<city>/ + gtFine/val/<city>/*_labelTrainIds.png",
           find_cityscapes, num_classes=19, ignore=255),
    Layout("pascal_context", "segmentation",
           "JPEGImages/ + SegmentationClassContext/*.png + ImageSets/SegmentationContext/val.txt",
           find_pascal_context, num_classes=59, shift=1),
    Layout("voc", "segmentation", "JPEGImages/ + SegmentationClass/*.png + ImageSets/Segmentation/val.txt",
           find_voc, num_classes=21, ignore=255),
    Layout("nyuv2", "depth", "images/ + depth/*.png (16-bit, millimetres)",
           _images_and("depth", "depth/*.png (16-bit, millimetres)", "nyuv2"),
           depth_scale=1000.0, max_depth=10.0, crop=EIGEN_CROP, crop_name="Eigen"),
    Layout("kitti", "depth", "images/ + depth/*.png (16-bit, metres x 256, 0 = no measurement)",
           _images_and("depth", "depth/*.png (16-bit, metres x 256)", "kitti"),
           depth_scale=256.0, max_depth=80.0, crop=GARG_CROP, crop_name="Garg"),
    Layout("saliency", "heatmap", "images/ + masks/*.png (DUTS-like, white = salient)",
           _images_and("masks", "masks/*.png", "saliency")),
    Layout("folder", None, "jpg/png images directly in the folder", find_folder),
)}


# images/ + depth/ is NYUv2's layout or KITTI's, which differ only in the encoding: the folder's name tells them
# apart (datasets/nyuv2, nyu_depth_v2, KITTI_val, ...), else --layout must.
DEPTH_NAMES = (("nyuv2", "nyu"), ("kitti", "kitti"))


def detect(root: Path) -> str:
    """The layout a folder has, when its structure says so unambiguously, or for depth maps its name."""
    signs = [("ade20k", "annotations/validation"), ("cityscapes", "gtFine/val"),
             ("pascal_context", "SegmentationClassContext"), ("voc", "SegmentationClass"), ("saliency", "masks")]
    for name, sub in signs:
        if (root / sub).is_dir():
            return name
    if (root / "depth").is_dir():
        folder = root.resolve().name.lower()
        named = [layout for layout, word in DEPTH_NAMES if word in folder]
        if len(named) == 1:
            return named[0]
        raise UserError(f"{root} holds depth maps but its name says neither nyu nor kitti: say which encoding with "
                        f"--layout nyuv2 (millimetres) or --layout kitti (metres x 256)")
    if (root / "images").is_dir():
        raise UserError(f"{root}/images has no ground-truth folder beside it that a layout knows; pass --layout "
                        f"({', '.join(LAYOUTS)}), or --dataset {root / 'images'} --layout folder")
    return "folder"


def open_dataset(root: str | Path, layout: str | None) -> tuple[Layout, list[Sample]]:
    """The layout (given or detected) and its samples; UserError when the folder does not match."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--dataset {root} is not a folder; pass the dataset's root folder")
    name = layout or detect(root)
    if name not in LAYOUTS:
        raise UserError(f"unknown --layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name], LAYOUTS[name].find(root)


# ------------------------------------------------------------------------------------------ ground truth


def read_array(path: Path) -> np.ndarray:
    """A label/depth/mask PNG as stored (palette PNGs give their indices, 16-bit PNGs their integers)."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as a PNG ({exc.__class__.__name__}); remove or replace it") from exc
    if arr.ndim != 2:
        raise UserError(f"{path} has {arr.shape[-1]} channels; ground truth must be a single-channel PNG")
    return arr


def _same_size(arr: np.ndarray, size: tuple[int, int], sample: Sample) -> None:
    if arr.shape != size:
        raise UserError(f"{sample.target} is {arr.shape[1]}x{arr.shape[0]} (WxH) but {sample.image.name} is "
                        f"{size[1]}x{size[0]}; ground truth must have the image's size")


def segmentation_target(layout: Layout, sample: Sample, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(class per pixel as int64, ignored pixels as bool); UserError for a value outside the classes."""
    assert sample.target is not None
    stored = read_array(sample.target).astype(np.int64)
    _same_size(stored, size, sample)
    ignore = stored == layout.ignore if layout.ignore is not None else np.zeros(stored.shape, bool)
    if layout.shift:
        ignore |= stored < layout.shift
    classes = stored - layout.shift
    bad = ~ignore & ((classes < 0) | (classes >= layout.num_classes))
    if bad.any():
        value = int(stored[bad][0])
        raise UserError(f"{sample.target} has label {value}, outside the {layout.name} layout's {layout.num_classes} "
                        f"classes (stored {layout.shift}..{layout.num_classes + layout.shift - 1}"
                        f"{'' if layout.ignore is None else f', {layout.ignore} = not scored'}"
                        f"{', 0 = not scored' if layout.shift else ''}); is it the right layout?")
    return np.where(ignore, 0, classes), ignore


def depth_target(layout: Layout, sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """Depth in metres, float64 (0 where not measured)."""
    assert sample.target is not None
    stored = read_array(sample.target)
    _same_size(stored, size, sample)
    if stored.dtype not in (np.uint16, np.int32, np.uint8):
        raise UserError(f"{sample.target} is not an integer PNG; the {layout.name} layout stores depth as 16-bit PNG")
    return stored.astype(np.float64) / layout.depth_scale


def depth_valid(layout: Layout, depth: np.ndarray) -> np.ndarray:
    """Pixels scored: measured, inside (min_depth, max_depth), inside the crop."""
    valid = (depth > layout.min_depth) & (depth < layout.max_depth)
    if layout.crop is not None:
        h, w = depth.shape
        top, bottom, left, right = layout.crop
        inside = np.zeros_like(valid)
        inside[int(top * h):int(bottom * h), int(left * w):int(right * w)] = True
        valid &= inside
    return valid


def saliency_target(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    assert sample.target is not None
    mask = read_array(sample.target)
    _same_size(mask, size, sample)
    return mask > 127


# ------------------------------------------------------------------------------ predictions, as stored


def encode_labels(layout: Layout, classes: np.ndarray) -> np.ndarray:
    """Class per pixel -> the layout's stored label values (uint8)."""
    return (classes + layout.shift).astype(np.uint8)


def encode_depth(layout: Layout, depth: np.ndarray) -> np.ndarray:
    """Metres -> the layout's 16-bit encoding (rounded; clipped to what 16 bits hold)."""
    return np.clip(np.rint(depth.astype(np.float64) * layout.depth_scale), 0, 65535).astype(np.uint16)


def decode_depth(layout: Layout, stored: np.ndarray) -> np.ndarray:
    """The stored integers -> metres, in float64 like the ground truth (a ratio of exactly 1.25 stays exact)."""
    return stored.astype(np.float64) / layout.depth_scale


def encode_saliency(heatmap: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> an 8-bit saliency map."""
    return np.clip(np.rint(heatmap.astype(np.float64) * 255), 0, 255).astype(np.uint8)
