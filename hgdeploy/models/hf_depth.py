"""Hugging Face depth models whose necks read intermediate layers (DPT, Depth Anything), run by our own loop.

We run the transformers modules (embeddings, blocks, neck, head) from our own small forward instead
of `DPTForDepthEstimation.forward` / `DepthAnythingForDepthEstimation.forward`, for three reasons
found in transformers 5:
1. hidden states are collected by forward hooks on every `DPTViTLayer` / `Dinov2Layer` instance
   (`capture_outputs`). After patching, the blocks inside a ClusteredSpan would record cluster
   tokens and the reconstructed output would be recorded nowhere. Our loop records the output of
   each entry of the layer list, so the state after the span's index is the reconstructed one.
2. DPT with a ViT or hybrid backbone gives its neck no patch grid and reshapes tokens to
   sqrt(N) x sqrt(N): non-square inputs (KITTI's 352x1216) fail. We pass the grid.
3. DPT-hybrid's embeddings refuse any size but config.image_size unless interpolate_pos_encoding
   is passed, which DPTModel never does. We pass it (the interpolation itself is HF's own).
The unpatched model computes exactly what the HF forward computes (checked at square sizes).
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

from torch import Tensor, nn

from hgdeploy.models.blocks import inspect_block


def as_int(value: Any) -> int:
    """A config value that may be one number or a pair of equal numbers (patch_size)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class HFDepth(nn.Module, abc.ABC):
    """pixel_values [B, 3, H, W] -> (predicted_depth [B, H, W],) from a transformers depth model `hf`."""

    model_type: ClassVar[str]

    def __init__(self, hf: nn.Module, input_size: tuple[int, int]):
        super().__init__()
        self.hf = hf
        self.input_size = input_size
        self.call = inspect_block(self.layers[0])  # once: how this transformers release's blocks answer

    @abc.abstractmethod
    def encoder(self) -> nn.Module:
        """The module whose `layer` ModuleList holds the transformer blocks."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder().layer

    @property
    def patch_size(self) -> int:
        return as_int(self.hf.config.patch_size)

    @abc.abstractmethod
    def reads(self) -> tuple[int, ...]:
        """Layer counts (c = the output after c blocks) whose outputs the neck reads, ascending."""

    def token_grid(self) -> tuple[int, int]:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    def run_layers(self, hidden: Tensor, counts: tuple[int, ...]) -> list[Tensor]:
        """The hidden states after each of `counts` blocks; stops after the last one read."""
        states = {0: hidden}
        for i, layer in enumerate(self.layers, start=1):
            if i > counts[-1]:
                break
            hidden = self.call.hidden(layer(hidden))
            states[i] = hidden
        return [states[c] for c in counts]

    def grid_of(self, pixel_values: Tensor) -> tuple[int, int]:
        return (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)


class DPTDepth(HFDepth):
    """DPTForDepthEstimation with a ViT (DPT-Large) or hybrid ResNet+ViT (DPT-Hybrid) encoder."""

    model_type = "dpt"

    def __init__(self, hf: nn.Module, input_size: tuple[int, int]):
        super().__init__(hf, input_size)
        # transformers 4.4x's DPT embeddings answer a tuple unless asked for their output object.
        params = inspect.signature(hf.dpt.embeddings.forward).parameters
        self.embed_kwargs = {"return_dict": True} if "return_dict" in params else {}
        if hf.config.is_hybrid:
            self.embed_kwargs["interpolate_pos_encoding"] = True

    def encoder(self) -> nn.Module:
        return self.hf.dpt.encoder

    def reads(self) -> tuple[int, ...]:
        """HF keeps hidden_states[1:][idx] for idx in backbone_out_indices (the hybrid: only [2:], its first
        two features are ResNet stages), i.e. the output after idx + 1 blocks."""
        indices = self.hf.config.backbone_out_indices
        vit = indices[2:] if self.hf.config.is_hybrid else indices
        return tuple(sorted({i + 1 for i in vit}))

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        embedded = self.hf.dpt.embeddings(pixel_values, **self.embed_kwargs)
        features = self.run_layers(embedded.last_hidden_states, self.reads())
        if self.hf.config.is_hybrid:
            features = list(embedded.intermediate_activations) + features
        fused = self.hf.neck(features, *self.grid_of(pixel_values))
        return (self.hf.head(fused),)


class DepthAnythingDepth(HFDepth):
    """DepthAnythingForDepthEstimation: DINOv2 backbone, DPT-style neck and head."""

    model_type = "depth_anything"

    def encoder(self) -> nn.Module:
        return self.hf.backbone.encoder

    def reads(self) -> tuple[int, ...]:
        """Dinov2Backbone's stage k is hidden_states[k], the output after k blocks (stage 0 = embeddings)."""
        return tuple(sorted(set(self.hf.backbone.out_indices)))

    def forward(self, pixel_values: Tensor) -> tuple[Tensor]:
        backbone = self.hf.backbone
        features = self.run_layers(backbone.embeddings(pixel_values), self.reads())
        if backbone.config.apply_layernorm:
            features = [backbone.layernorm(f) for f in features]
        grid = self.grid_of(pixel_values)
        return (self.hf.head(self.hf.neck(features, *grid), *grid),)


WRAPPERS: dict[str, type[HFDepth]] = {"dpt": DPTDepth, "depth_anything": DepthAnythingDepth}
