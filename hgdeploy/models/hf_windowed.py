"""transformers' windowed-attention models as hgdeploy runs them: pixel_values in, a tuple of named tensors out.

Mask2Former (Swin backbone): its class and mask logits, and the semantic map Mask2Former's semantic inference
makes of them (per-class sum of query masks weighted by the class probabilities, no-object dropped, resized to
the input). SwinV2 backbone: its four stage feature maps. SAM: the vision encoder's image embeddings (what the
prompt and mask decoders read). The wrappers only call the transformers modules; where the blocks of a stage are
is stated once here (`stages`, `layers`), for the adapters that patch them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class HFWrapper(nn.Module):
    """A transformers model `hf` run at one input size."""

    def __init__(self, hf: nn.Module, input_size: tuple[int, int]):
        super().__init__()
        self.hf = hf
        self.input_size = tuple(input_size)


class Mask2FormerSemantic(HFWrapper):
    """pixel_values -> (class logits [B, Q, K + 1], mask logits [B, Q, H / 4, W / 4], semantic [B, K, H, W])."""

    output_names = ("class_logits", "mask_logits", "semantic")

    @property
    def backbone(self) -> nn.Module:
        return self.hf.model.pixel_level_module.encoder  # transformers' SwinBackbone

    @property
    def backbone_config(self) -> Any:
        return self.hf.config.backbone_config

    @property
    def stages(self) -> nn.ModuleList:
        return self.backbone.swin.encoder.layers

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.hf(pixel_values=pixel_values)
        classes, masks = out.class_queries_logits, out.masks_queries_logits
        probs = classes.softmax(-1)[..., :-1]  # [B, Q, K]
        B, Q, h, w = masks.shape
        # a MatMul, not Einsum: TensorRT's Einsum is the op mmdeploy's Mask2Former exports trip on
        semantic = (probs.transpose(1, 2) @ masks.sigmoid().reshape(B, Q, h * w)).reshape(B, -1, h, w)
        semantic = nn.functional.interpolate(semantic, size=self.input_size, mode="bilinear", align_corners=False)
        return classes, masks, semantic


class Swinv2Features(HFWrapper):
    """pixel_values -> the four stage feature maps [B, C_i, H_i, W_i] of transformers' Swinv2Backbone."""

    output_names = ("stage1", "stage2", "stage3", "stage4")

    @property
    def backbone_config(self) -> Any:
        return self.hf.config

    @property
    def stages(self) -> nn.ModuleList:
        return self.hf.encoder.layers

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.hf(pixel_values).feature_maps)


class SamImageEncoder(HFWrapper):
    """pixel_values -> (image embeddings [B, 256, H / 16, W / 16],) of a SamModel's vision encoder; the whole
    SamModel is kept so a checkpoint saved from it is the folder users have (facebook/sam-vit-huge)."""

    output_names = ("image_embeddings",)

    @property
    def encoder(self) -> nn.Module:
        return self.hf.vision_encoder

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        return (self.encoder(pixel_values).last_hidden_state,)


def randomised(hf: nn.Module, bias_std: float = 0.5) -> nn.Module:
    """Re-draw the weights with torch's default layer init (seed 0), relative-position tables random too.

    transformers' init (normal 0.02, zero bias tables; SAM's 1e-10) makes a tiny random model answer near zero,
    where every comparison passes; fan-in scaled weights keep activations of order one, and random bias tables
    make a resized table matter.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()
        for name, p in hf.named_parameters():
            if "relative_position_bias_table" in name or "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, bias_std)
    return hf.eval()
