"""SAM's image encoder (transformers' SamModel, vision encoder: a ViT with 14 x 14 windows and global-attention
layers): window token clustering from layer alpha on, as the authors' Expedit-SAM (hourglass_image_encoder.py).

cluster.grid is the clustered window (SAM ViT-H: 14 x 14 -> 10 x 10, 100 clusters a window); the global layers
attend over the whole clustered map; reconstruction defaults to after the last layer, before the neck (the
authors' place). Output: the image embeddings the prompt and mask decoders read. SAM's position embedding is
learned for one size (1024 x 1024: 64 x 64 tokens), so a checkpoint runs at its own size; model.arch builds the
architecture at any square size that is a multiple of the patch (the CI shape).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess, check_patch_multiple
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.models import hf_folder
from hgdeploy.models.hf_windowed import SamImageEncoder, randomised
from hgdeploy.spans.sam import insert_sam_span
from hgdeploy.spans.swin import window_options

# model.arch -> SamConfig keyword arguments (the vision encoder's; the prompt and mask decoders keep SamConfig's
# defaults, the published ones).
ARCHS = {
    # facebook/sam-vit-huge: ViT-H/16, 32 layers 1280 wide, windows of 14, global attention at 7, 15, 23, 31
    "vit-huge": lambda: {"vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                           "global_attn_indexes": [7, 15, 23, 31], "image_size": 1024,
                                           "patch_size": 16, "window_size": 14, "output_channels": 256,
                                           "mlp_dim": 5120}},
}
TINY = {"vision_config": {"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                          "image_size": 64, "patch_size": 4, "window_size": 6, "global_attn_indexes": [2],
                          "mlp_dim": 64}}


def _classes() -> tuple[Any, Any]:
    from transformers import SamConfig, SamModel

    return SamConfig, SamModel


def _fitted(input_size: tuple[int, int], from_arch: bool) -> Any:
    def fit(config: Any) -> Any:
        v = config.vision_config
        check_patch_multiple(input_size, v.patch_size, "sam")
        if input_size[0] != input_size[1]:
            raise UserError(f"sam: model.input_size {input_size[0]}x{input_size[1]} must be square (SAM pads images to "
                            f"a square, {v.image_size}x{v.image_size} for these weights)")
        if from_arch:
            v.image_size = input_size[0]
        elif v.image_size != input_size[0]:
            raise UserError(f"sam: these weights run at {v.image_size}x{v.image_size} (their position embedding is "
                            f"learned for it); set model.input_size = \"{v.image_size}x{v.image_size}\"")
        return config
    return fit


def _fingerprint(config: Any) -> hf_folder.Fingerprint:
    v = config.vision_config
    return {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers, "window_size": v.window_size}


def load(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> SamImageEncoder:
    config_class, model_class = _classes()
    hf = hf_folder.load_or_build("sam", checkpoint, options, ARCHS, "sam", config_class, model_class,
                                 _fitted(input_size, checkpoint is None), _fingerprint, randomise=randomised)
    return SamImageEncoder(hf, input_size).eval()


def facts(model: nn.Module) -> ModelFacts:
    v = model.hf.config.vision_config
    return ModelFacts(token_grid=(v.window_size, v.window_size), depth=v.num_hidden_layers,
                      preprocess=Preprocess(model.input_size, "bilinear"))


def patch(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    if not isinstance(model, SamImageEncoder):
        raise UserError(f"the sam adapter patches models it loaded, got {type(model).__name__}")
    options = window_options(plan, "sam")
    v = model.hf.config.vision_config
    size = (model.input_size[0] // v.patch_size, model.input_size[1] // v.patch_size)
    if min(size) <= v.window_size:
        raise UserError(f"sam: a {size[0]}x{size[1]} token map is at most one {v.window_size}x{v.window_size} window: "
                        f"nothing to cluster; use a larger model.input_size")
    insert_sam_span(model.encoder, size, plan.alpha, plan.grid[0], after=plan.reconstruct_after, **options)
    return model


def tiny() -> tuple[SamImageEncoder, tuple[int, int]]:
    config_class, model_class = _classes()
    return SamImageEncoder(randomised(model_class(config_class(**TINY))), (64, 64)).eval(), (64, 64)


FAMILY = Family(
    name="sam", summary="SAM image encoder (transformers SamModel, ViT with windows and global layers): window "
                        "clustering from one layer on; save_pretrained folder",
    outputs=(("image_embeddings", "features"),),
    load=load, patch=patch, facts=facts, tiny=tiny, write_checkpoint=hf_folder.write_checkpoint,
    options=("arch",), tunable=False,
)
