"""Window token clustering in transformers' SAM vision encoder: zero reduction is the unpatched encoder, the
re-fitted windowed and global layers carry relative positions resized once, a real reduction keeps the shapes."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hgdeploy.spans.sam import SamWindowSpan, insert_sam_span  # noqa: E402
from hgdeploy.spans.window_attention import resize_rel_pos  # noqa: E402


def _tiny_sam(image_size: int = 64):
    """Patch 4, windows of 6 and one global layer: 64 pixels give a 16 x 16 map (padded to 18 x 18, 9 windows),
    72 pixels an 18 x 18 map (9 windows, no padding)."""
    from transformers.models.sam.configuration_sam import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    torch.manual_seed(0)
    cfg = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=2,
                          image_size=image_size, patch_size=4, window_size=6, global_attn_indexes=[2], mlp_dim=64,
                          use_rel_pos=True)
    model = SamVisionEncoder(cfg).eval()
    with torch.no_grad():  # SAM's config initialises with std 1e-10: a model of near-zeros would prove nothing
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                torch.nn.init.normal_(p, std=0.5)
            elif p.dim() > 1:
                torch.nn.init.normal_(p, std=0.1)
    return model


def _pre_neck(model, x):
    """The encoder's tokens before the neck (a randomly initialised neck answers ~1e-22 whatever it gets)."""
    seen = []
    handle = model.neck.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _patch(model, cluster_window, tau, side=16):
    patched = copy.deepcopy(model)
    insert_sam_span(patched, (side, side), alpha=1, cluster_window=cluster_window, neighbours=3, iters=3, tau=tau, k=4)
    return patched.eval()


def test_zero_reduction_reproduces_the_sam_encoder_on_whole_windows():
    model = _tiny_sam(72)
    x = torch.randn(1, 3, 72, 72)
    want, got = _pre_neck(model, x), _pre_neck(_patch(model, 6, 1e-6, side=18), x)
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_zero_reduction_reproduces_the_sam_encoder_on_padded_windows_too():
    """SAM ViT-H's 64 x 64 map is not whole windows of 14: SAM pads with zeros in every windowed layer and its
    global layers never see padding; the clusters of the padding are dropped, so the identity holds there too."""
    model = _tiny_sam(64)
    x = torch.randn(1, 3, 64, 64)
    want, got = _pre_neck(model, x), _pre_neck(_patch(model, 6, 1e-6), x)
    assert got.shape == want.shape and (got - want).abs().max() / want.abs().max() < 1e-5


def test_windowed_and_global_layers_get_their_relative_positions_resized_once():
    model = _tiny_sam()
    patched = _patch(model, 4, 0.5)
    span = patched.layers[1]
    # 16 x 16 pads to 18 x 18: 3 x 3 windows of 4 x 4 clusters, 11 rows and columns start inside (11 * 6 / 4 < 16)
    assert isinstance(span, SamWindowSpan) and span.clustering.clustered_size == (11, 11)
    windowed, global_ = span.blocks[0], span.blocks[1]  # encoder layers 1 and 2
    assert windowed.window_size == 4 and windowed.attn.rel_pos_h.shape[0] == 7
    assert torch.allclose(windowed.attn.rel_pos_h, resize_rel_pos(model.layers[1].attn.rel_pos_h.detach(), 7))
    assert global_.window_size == 0 and global_.attn.rel_pos_w.shape[0] == 21  # 2 x 11 - 1 over the clustered map
    assert model.layers[1].window_size == 6 and model.layers[1].attn.rel_pos_h.shape[0] == 11  # originals untouched
    x = torch.randn(1, 3, 64, 64)
    want, got = _pre_neck(model, x), _pre_neck(patched, x)
    assert got.shape == want.shape and torch.isfinite(got).all() and not torch.allclose(got, want, atol=1e-4)
