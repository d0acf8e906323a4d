"""Segmenter (Strudel et al., ICCV 2021) rebuilt module for module in the authors' layout.

Parameter names, shapes and the forward computation follow rstrudel/segmenter (`segm/model/`:
vit.py, decoder.py, segmenter.py, blocks.py, factory.py) so its `checkpoint.pth` files load with
strict key matching. Dropout and drop-path are inference no-ops and are left out; they hold no
weights. The one addition: decoders expose `token_logits` (per-token class logits before they are
laid out as an image) so the clustered model can run the decoder on cluster tokens and rebuild the
logits, as the official expedited Segmenter does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hgdeploy.core.preprocess import IMAGENET_MEAN, IMAGENET_STD

# Segmenter's "normalization" names (segm/data/utils.py STATS).
NORMALIZATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "deit": (IMAGENET_MEAN, IMAGENET_STD),
}
# Backbone sizes of the official configs (segm/config.yml): name -> (d_model, n_heads, n_layers).
SIZES = {"tiny": (192, 3, 12), "small": (384, 6, 12), "base": (768, 12, 12), "large": (1024, 16, 24)}
BACKBONE_RE = re.compile(r"(vit|deit)_(tiny|small|base|large)_(?:distilled_)?patch(\d+)_(\d+)")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5 as in the authors' code)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    def __init__(self, image_size: tuple[int, int], patch_size: int, embed_dim: int, channels: int = 3):
        super().__init__()
        self.image_size = image_size
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, im: Tensor) -> Tensor:
        return self.proj(im).flatten(2).transpose(1, 2)


def resize_pos_embed(posemb: Tensor, old: tuple[int, int], new: tuple[int, int], extra: int) -> Tensor:
    """The authors' resize: bilinear interpolation of the grid part, extra tokens kept."""
    tok, grid = posemb[:, :extra], posemb[0, extra:]
    grid = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    return torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


class VisionTransformer(nn.Module):
    """segm/model/vit.py VisionTransformer (its ImageNet head is kept: checkpoints hold it)."""

    def __init__(self, image_size: tuple[int, int], patch_size: int, n_layers: int, d_model: int, d_ff: int,
                 n_heads: int, n_cls: int = 1000, distilled: bool = False, channels: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbedding(image_size, patch_size, d_model, channels)
        self.patch_size = patch_size
        self.n_layers = n_layers
        self.d_model = d_model
        self.distilled = distilled
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
            self.head_dist = nn.Linear(d_model, n_cls)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + self.num_extra_tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_ff) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_cls)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_extra_tokens(self) -> int:
        return 1 + int(self.distilled)

    def embed(self, im: Tensor) -> Tensor:
        """Patch tokens with the class (and distillation) token prepended and positions added."""
        B, _, H, W = im.shape
        x = self.patch_embed(im)
        extra = [self.cls_token.expand(B, -1, -1)]
        if self.distilled:
            extra.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat([*extra, x], dim=1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            new = (H // self.patch_size, W // self.patch_size)
            pos = resize_pos_embed(pos, self.patch_embed.grid_size, new, self.num_extra_tokens)
        return x + pos

    def features(self, im: Tensor) -> Tensor:
        x = self.embed(im)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DecoderLinear(nn.Module):
    def __init__(self, n_cls: int, patch_size: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.head = nn.Linear(d_encoder, n_cls)

    def token_logits(self, x: Tensor) -> Tensor:
        return self.head(x)


class MaskTransformer(nn.Module):
    """segm/model/decoder.py MaskTransformer: class embeddings attend jointly with the patches."""

    def __init__(self, n_cls: int, patch_size: int, d_encoder: int, n_layers: int, n_heads: int, d_model: int,
                 d_ff: int):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.scale = d_model ** -0.5
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_ff) for _ in range(n_layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def token_logits(self, x: Tensor) -> Tensor:
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = x[:, : -self.n_cls] @ self.proj_patch
        classes = x[:, -self.n_cls:] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        return self.mask_norm(patches @ classes.transpose(1, 2))


@dataclass(frozen=True)
class NetConfig:
    """The `net_kwargs` of a Segmenter variant.yml that decide the architecture."""

    backbone: str
    image_size: tuple[int, int]
    patch_size: int
    d_model: int
    n_heads: int
    n_layers: int
    n_cls: int
    decoder: str = "mask_transformer"
    decoder_layers: int = 2
    distilled: bool = False
    normalization: str = "vit"

    def to_net_kwargs(self) -> dict:
        """net_kwargs as the authors' training script writes them (dropout values are irrelevant here)."""
        decoder = {"name": self.decoder, "drop_path_rate": 0.0, "dropout": 0.1, "n_cls": self.n_cls}
        if self.decoder == "mask_transformer":
            decoder["n_layers"] = self.decoder_layers
        return {"backbone": self.backbone, "d_model": self.d_model, "decoder": decoder, "distilled": self.distilled,
                "drop_path_rate": 0.1, "dropout": 0.0, "image_size": tuple(self.image_size), "n_cls": self.n_cls,
                "n_heads": self.n_heads, "n_layers": self.n_layers, "normalization": self.normalization,
                "patch_size": self.patch_size}


class Segmenter(nn.Module):
    """pixel_values [B, 3, H, W] -> (class logits [B, n_cls, H, W],), H and W multiples of the patch."""

    output_names = ("logits",)

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.encoder = VisionTransformer(config.image_size, config.patch_size, config.n_layers, d, 4 * d,
                                         config.n_heads, n_cls=1000, distilled=config.distilled)
        if config.decoder == "mask_transformer":
            self.decoder: nn.Module = MaskTransformer(config.n_cls, config.patch_size, d, config.decoder_layers,
                                                      d // 64, d, 4 * d)
        else:
            self.decoder = DecoderLinear(config.n_cls, config.patch_size, d)

    def to_image(self, token_logits: Tensor, size: tuple[int, int]) -> Tensor:
        """[B, N, n_cls] per-patch logits -> [B, n_cls, H, W], bilinear like the authors' code."""
        H, W = size
        grid = (H // self.config.patch_size, W // self.config.patch_size)
        masks = token_logits.transpose(1, 2).reshape(token_logits.shape[0], -1, *grid)
        return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)

    def forward(self, im: Tensor) -> tuple[Tensor]:
        x = self.encoder.features(im)[:, self.encoder.num_extra_tokens:]
        return (self.to_image(self.decoder.token_logits(x), (im.shape[2], im.shape[3])),)


def config_for(backbone: str, n_cls: int, image_size: tuple[int, int], decoder: str = "mask_transformer",
               decoder_layers: int = 2) -> NetConfig:
    """The architecture of an official backbone name, e.g. "vit_large_patch16_384"."""
    m = BACKBONE_RE.fullmatch(backbone)
    if not m:
        raise ValueError(backbone)
    kind, size, patch, _ = m.groups()
    d, heads, layers = SIZES[size]
    return NetConfig(backbone=backbone, image_size=image_size, patch_size=int(patch), d_model=d, n_heads=heads,
                     n_layers=layers, n_cls=n_cls, decoder=decoder, decoder_layers=decoder_layers,
                     distilled="distilled" in backbone, normalization="deit" if kind == "deit" else "vit")
