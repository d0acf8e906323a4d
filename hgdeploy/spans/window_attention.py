"""Windowed attention re-fitted to the clustered window at patch time: what the blocks between window token
clustering and reconstruction need (Swin's bias table and index, SwinV2's coordinate table, SAM's decomposed
relative positions).

The authors resize Swin's table at the first forward and keep Python state for it; an export must see
constants, so every table here is computed once, when the model is patched, and the forward pass only
indexes it. Same interpolation as the authors: bilinear (Swin) or linear (SAM), align_corners False.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize_bias_table(table: Tensor, window: int, new_window: int) -> Tensor:
    """Swin's relative-position-bias table [(2K-1)^2, heads] -> [(2k-1)^2, heads], resized bilinearly as a
    (2K-1) x (2K-1) map per head (rows: vertical offset, columns: horizontal offset)."""
    side, new_side = 2 * window - 1, 2 * new_window - 1
    heads = table.shape[1]
    if table.shape[0] != side * side:
        raise ValueError(f"bias table has {table.shape[0]} rows, a window of {window} needs {side * side}")
    maps = table.t().reshape(1, heads, side, side)
    out = F.interpolate(maps.float(), size=(new_side, new_side), mode="bilinear", align_corners=False)
    return out.reshape(heads, new_side * new_side).t().contiguous().to(table.dtype)


def relative_position_index(window: int) -> Tensor:
    """[k^2, k^2] index into a (2k-1)^2 bias table for every (query, key) pair of a k x k window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def swinv2_coords_table(window: int, new_window: int, pretrained_window: int = 0) -> Tensor:
    """SwinV2's log-spaced relative coordinates [1, 2k-1, 2k-1, 2] for a k x k window of clusters.

    A cluster of a k-window stands for K / k tokens, so its offsets are scaled by (K-1)/(k-1) back into the
    original window's token offsets and normalised as the layer normalises them (by the pretrained window,
    else by K-1): the window's extreme offsets keep the positions they had, and k = K is the layer's own
    table. (The authors publish no SwinV2 code; this is our choice, stated so.)
    """
    offsets = torch.arange(-(new_window - 1), new_window, dtype=torch.float32)
    if new_window > 1:
        offsets = offsets * (window - 1) / (new_window - 1)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij")).permute(1, 2, 0).unsqueeze(0).contiguous()
    norm = (pretrained_window if pretrained_window > 0 else window) - 1
    table = (table / norm if norm > 0 else table) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """SAM's decomposed relative positions [L, C] -> [length, C], linear (what its get_rel_pos does at every
    forward when the sizes differ; done once here)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    out = F.interpolate(rel_pos.t().unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return out[0].t().contiguous().to(rel_pos.dtype)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy whose submodules, parameters and buffers are the original's objects, in dicts of its own (so
    replacing one in the copy leaves the original as it was)."""
    new = copy.copy(module)
    new._modules, new._parameters, new._buffers = dict(module._modules), dict(module._parameters), dict(module._buffers)
    return new
