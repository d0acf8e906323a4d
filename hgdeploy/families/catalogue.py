"""The model families that ship with hgdeploy, listed explicitly (nothing registers itself on import).

A new family: write its adapter module (a `Family` record and the code it points at), then add the
record here; the tests are parametrised from this list.
"""

from __future__ import annotations

from hgdeploy.families import focus, hf_depth, mask2former, sam, segmenter, swinv2, timm_vit, torchvision_vit
from hgdeploy.families.registry import Family, Registry

BUILTIN = Registry([
    focus.FAMILY,
    segmenter.FAMILY,
    hf_depth.DPT,
    hf_depth.DEPTH_ANYTHING,
    timm_vit.FAMILY,
    torchvision_vit.FAMILY,
    mask2former.FAMILY,
    swinv2.FAMILY,
    sam.FAMILY,
])


def get_family(name: str) -> Family:
    """The built-in family of that name; UserError listing the known ones otherwise."""
    return BUILTIN.get(name)


def families() -> list[Family]:
    """Every built-in family, in name order."""
    return list(BUILTIN)
