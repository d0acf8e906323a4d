"""The DINOv2 adapter: identity at zero reduction, loud refusal of unsupported models, span layout."""

from __future__ import annotations

import copy

import pytest
import torch

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan
from hgdeploy.families.dinov2 import patch_dinov2
from hgdeploy.spans.vit import ClusteredSpan, Passthrough


def _plan(grid, alpha=1, after=4, tau=1e-4, k=4):
    return ClusterPlan(token_grid=(8, 8), grid=grid, alpha=alpha, reconstruct_after=after, depth=4, neighbours=3,
                       iters=3, tau=tau, k=k)


@pytest.mark.parametrize("alpha,after", [(1, 4), (2, 3), (1, 2)])
def test_zero_reduction_reproduces_the_model(tiny_dinov2, alpha, after):
    x = torch.randn(2, 3, 112, 112)
    patched = copy.deepcopy(tiny_dinov2)
    patch_dinov2(patched, _plan((8, 8), alpha, after))
    with torch.no_grad():
        ref = tiny_dinov2(pixel_values=x).last_hidden_state
        got = patched(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_real_reduction_changes_output_but_keeps_shape(tiny_dinov2):
    x = torch.randn(1, 3, 112, 112)
    patched = copy.deepcopy(tiny_dinov2)
    patch_dinov2(patched, _plan((4, 4), tau=1.0))
    with torch.no_grad():
        ref = tiny_dinov2(pixel_values=x).last_hidden_state
        got = patched(pixel_values=x).last_hidden_state
    assert got.shape == ref.shape
    assert not torch.allclose(got, ref, atol=1e-3)


def test_span_keeps_layer_indices(tiny_dinov2):
    patched = copy.deepcopy(tiny_dinov2)
    patch_dinov2(patched, _plan((4, 4), alpha=1, after=3))
    kinds = [type(m) for m in patched.encoder.layer]
    assert len(kinds) == 4
    assert kinds[1] is ClusteredSpan and kinds[2] is Passthrough and kinds[3] not in (ClusteredSpan, Passthrough)
    assert len(patched.encoder.layer[1].blocks) == 2


def test_refuses_other_models():
    with pytest.raises(UserError, match="Dinov2Model"):
        patch_dinov2(torch.nn.Linear(2, 2), _plan((4, 4)))


def test_plan_depth_must_match(tiny_dinov2):
    plan = ClusterPlan(token_grid=(8, 8), grid=(4, 4), alpha=1, reconstruct_after=6, depth=6, k=4)
    with pytest.raises(ValueError, match="6 layers"):
        patch_dinov2(copy.deepcopy(tiny_dinov2), plan)
