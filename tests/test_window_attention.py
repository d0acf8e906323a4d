"""Windowed attention re-fitted to the clustered window at patch time, against independent computations: a
numpy bilinear/linear resize written from the definition (half-pixel centres, align_corners False, as the
authors' first-forward F.interpolate) and transformers' own Swin / SwinV2 index and coordinate tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hgdeploy.spans.window_attention import (
    relative_position_index,
    resize_bias_table,
    resize_rel_pos,
    swinv2_coords_table,
)


def _linear_1d(src: np.ndarray, size: int) -> np.ndarray:
    """Resize along axis 0 with half-pixel centres: x = (i + 0.5) * n / size - 0.5, clamped at 0."""
    n = src.shape[0]
    out = np.empty((size, *src.shape[1:]))
    for i in range(size):
        x = max((i + 0.5) * n / size - 0.5, 0.0)
        lo = min(int(np.floor(x)), n - 1)
        hi = min(lo + 1, n - 1)
        t = x - lo
        out[i] = (1 - t) * src[lo] + t * src[hi]
    return out


def test_the_bias_table_is_resized_bilinearly_per_head_as_the_authors_first_forward_does():
    torch.manual_seed(0)
    K, k, heads = 12, 8, 3
    table = torch.randn((2 * K - 1) ** 2, heads)
    got = resize_bias_table(table, K, k).numpy()
    maps = table.numpy().T.reshape(heads, 2 * K - 1, 2 * K - 1)
    expected = np.stack([_linear_1d(_linear_1d(m, 2 * k - 1).T, 2 * k - 1).T for m in maps])  # rows, then columns
    assert got.shape == ((2 * k - 1) ** 2, heads)
    assert np.allclose(got, expected.reshape(heads, -1).T, atol=1e-5)
    assert torch.equal(resize_bias_table(table, K, K), table)
    with pytest.raises(ValueError, match="needs 529"):
        resize_bias_table(table[:-1], K, k)


def test_the_relative_position_index_and_swinv2_coordinates_are_transformers_own_for_the_window():
    from transformers import Swinv2Config
    from transformers.models.swin import modeling_swin
    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

    for window in (8, 7):
        if hasattr(modeling_swin, "SwinRelativePositionBias"):  # transformers 5.2x keeps the index in its own module
            hf = modeling_swin.SwinRelativePositionBias(2, (window, window)).relative_position_index
        else:
            hf = modeling_swin.SwinSelfAttention(modeling_swin.SwinConfig(), 32, 2, window).relative_position_index
        assert torch.equal(relative_position_index(window), hf.view(window * window, window * window))
    for pretrained in (0, 12):
        hf2 = Swinv2SelfAttention(Swinv2Config(), dim=32, num_heads=2, window_size=12,
                                  pretrained_window_size=(pretrained, pretrained))
        assert torch.allclose(swinv2_coords_table(12, 12, pretrained), hf2.relative_coords_table, atol=1e-6)
    small = swinv2_coords_table(12, 8)
    assert small.shape == (1, 15, 15, 2)
    assert torch.allclose(small[0, 0, 0], swinv2_coords_table(12, 12)[0, 0, 0])  # the extreme offsets keep their place


def test_sam_relative_positions_are_resized_linearly_once():
    torch.manual_seed(1)
    rel = torch.randn(27, 16)  # a 14-token window: 2 * 14 - 1 offsets
    got = resize_rel_pos(rel, 19).numpy()  # a 10-cluster window
    assert np.allclose(got, _linear_1d(rel.numpy(), 19), atol=1e-5)
    assert resize_rel_pos(rel, 27) is rel
