"""Window token clustering inside a stage of transformers' Swin: zero reduction is the unpatched model, the
re-fitted blocks share the weights and carry the resized bias table, a real reduction keeps every shape."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
modeling_swin = pytest.importorskip("transformers.models.swin.modeling_swin")
if not hasattr(modeling_swin, "SwinRelativePositionBias"):
    pytest.skip("this transformers keeps Swin's bias table in SwinSelfAttention (before 5.2x): the window span is "
                "written for the current layout", allow_module_level=True)

from hgdeploy.core.errors import UserError  # noqa: E402
from hgdeploy.spans.swin import SwinWindowSpan, insert_window_span  # noqa: E402
from hgdeploy.spans.window_attention import resize_bias_table  # noqa: E402


def _tiny_swin(image_size: int = 64):
    """Patch 4 on 64x64: stage maps 16, 8, 4; window 4; stage 1 (8x8, four 4x4 windows) is clustered."""
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 2],
                                  window_size=4, drop_path_rate=0.0)
    model = transformers.SwinModel(cfg).eval()
    for p in model.parameters():  # trained-looking bias tables: random, not zeros
        if p.dim() == 2 and p.shape[0] == 49:
            torch.nn.init.normal_(p, std=0.5)
    return model


def _patched(cluster_window: int, tau: float, model=None):
    import copy

    base = model or _tiny_swin()
    patched = copy.deepcopy(base)
    blocks = list(patched.encoder.layers[1].blocks)
    insert_window_span(patched.encoder.layers[1], (8, 8), alpha=0, after=2, cluster_window=cluster_window,
                       neighbours=3, iters=3, tau=tau, k=4)
    return base, patched.eval(), blocks


def test_zero_reduction_reproduces_the_unpatched_swin():
    base, patched, _ = _patched(cluster_window=4, tau=1e-6)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = base(x).last_hidden_state, patched(x).last_hidden_state
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_zero_reduction_reproduces_swin_on_a_map_of_partial_windows():
    """Mask2Former Swin-L at 640 x 640: stage 3 is 40 x 40 in windows of 12 (padded to 48). Here stage 1 is
    9 x 9 in windows of 4 (padded to 12): Swin pads every layer; the clustered span drops the padding's clusters."""
    base = _tiny_swin(72)
    patched = copy.deepcopy(base)
    insert_window_span(patched.encoder.layers[1], (9, 9), alpha=0, after=2, cluster_window=4, neighbours=3, iters=3,
                       tau=1e-6, k=4)
    x = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        want, got = base(x).last_hidden_state, patched.eval()(x).last_hidden_state
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_reduced_windows_share_the_weights_and_carry_the_resized_bias_table():
    base, patched, blocks = _patched(cluster_window=2, tau=0.5)
    span = patched.encoder.layers[1].blocks[0]
    assert isinstance(span, SwinWindowSpan) and span.clustering.clustered_size == (4, 4)
    original = base.encoder.layers[1].blocks[1]
    refit = span.blocks[1]
    assert refit.window_size == 2 and refit.shift_size == 1  # shifted block: k // 2
    assert refit.attention.q_proj is blocks[1].attention.q_proj and refit.mlp is blocks[1].mlp  # weights shared
    assert blocks[1].window_size == 4 and blocks[1].attention.relative_position_bias.window_size == (4, 4)
    table = refit.attention.relative_position_bias.relative_position_bias_table
    assert torch.allclose(table, resize_bias_table(original.attention.relative_position_bias.
                                                   relative_position_bias_table.detach(), 4, 2))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = base(x).last_hidden_state, patched(x).last_hidden_state
    assert got.shape == want.shape and torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos < 0.9999  # a real change (random tiny weights say nothing of its quality)


def test_a_map_of_one_window_has_nothing_to_cluster():
    base = _tiny_swin()
    with pytest.raises(ValueError, match="at most one 4x4 window"):
        insert_window_span(base.encoder.layers[2], (4, 4), alpha=0, after=2, cluster_window=2, neighbours=3,
                           iters=3, tau=0.5, k=4)


def test_a_plan_counted_over_the_network_maps_to_one_stage():
    from hgdeploy.spans.swin import stage_blocks

    assert stage_blocks((2, 2, 18, 2), 12, 22) == (2, 8, 18)  # the paper's SwinV2-L: alpha 12, alpha + beta 22
    assert stage_blocks((2, 2, 18, 2), 10, 22) == (2, 6, 18)  # Mask2Former COCO panoptic: stage-3 block 6
    with pytest.raises(UserError, match="reconstruct at most after block 22"):
        stage_blocks((2, 2, 18, 2), 12, 23)


def test_swinv2_windows_rebuild_the_coordinate_table_and_zero_reduction_is_the_model():
    import copy

    from hgdeploy.spans.window_attention import swinv2_coords_table

    torch.manual_seed(0)
    cfg = transformers.Swinv2Config(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 2],
                                    window_size=4, drop_path_rate=0.0)
    base = transformers.Swinv2Model(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    for k, tau in ((4, 1e-6), (2, 0.5)):
        patched = copy.deepcopy(base)
        insert_window_span(patched.encoder.layers[1], (8, 8), alpha=0, after=2, cluster_window=k, neighbours=3,
                           iters=3, tau=tau, k=4)
        with torch.no_grad():
            want, got = base(x).last_hidden_state, patched.eval()(x).last_hidden_state
        if k == 4:
            assert (got - want).abs().max() / want.abs().max() < 1e-5
        else:
            inner = patched.encoder.layers[1].blocks[0].blocks[1].attention.self
            assert torch.allclose(inner.relative_coords_table, swinv2_coords_table(4, 2))
            assert inner.window_size == (2, 2) and got.shape == want.shape and torch.isfinite(got).all()
            assert base.encoder.layers[1].blocks[1].attention.self.window_size == (4, 4)  # the original untouched
