"""The other parameter-free way to save compute: run the unpatched model on a smaller input.

To compare it with clustering at equal cost its outputs are brought back to the full-size outputs' shapes
(bilinear, like a user upsampling a prediction) and scored with the same metrics. Sizes stay multiples of
the patch, from one token row less than the recipe's size down to half of it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def smaller_sizes(size: tuple[int, int], token_grid: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """(h, w) inputs with one token row and column fewer each step, the aspect kept, down to half the grid."""
    (h, w), (gh, gw) = size, token_grid
    ph, pw = h // gh, w // gw
    for rows in range(gh - 1, max(gh // 2, 1) - 1, -1):
        cols = max(1, round(rows * gw / gh))
        yield rows * ph, cols * pw


def _bilinear(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False).numpy()


def resize_output(a: np.ndarray, kind: str, like: np.ndarray, grid: tuple[int, int],
                  full_grid: tuple[int, int]) -> np.ndarray:
    """An output of the downscaled model in the shape of the full-size one's.

    Maps ([B, K, h, w] segmentation, heatmap or features, [B, h, w] depth) are resized bilinearly; tokens [B, P + n, C]
    are resized as a grid (`grid` -> `full_grid`), their P prefix tokens kept; class logits are unchanged.
    """
    if kind == "classification" or a.shape == like.shape:
        return a
    if kind in ("heatmap", "segmentation", "features"):
        return _bilinear(a, like.shape[-2:])
    if kind == "depth":
        return _bilinear(a[:, None], like.shape[-2:])[:, 0]
    if kind == "tokens":
        n = grid[0] * grid[1]
        prefix, patches = a[:, : a.shape[1] - n], a[:, a.shape[1] - n:]
        maps = patches.reshape(a.shape[0], grid[0], grid[1], -1).transpose(0, 3, 1, 2)
        full = _bilinear(maps, full_grid).transpose(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[-1])
        return np.concatenate([prefix, full], axis=1)
    raise ValueError(f"no resize for output kind {kind!r}")
