"""Adapters for Hugging Face depth models whose necks read intermediate layers: DPT and Depth Anything.

Checkpoints are the folders `save_pretrained` writes (config.json + model.safetensors); without one,
`model.arch` names a configuration whose published config.json values are data here (no hub access).
The models run through our own loop (`hgdeploy.models.hf_depth`, which says why).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess, check_patch_multiple
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.models import hf_folder
from hgdeploy.models.checkpoints import load_state_strict
from hgdeploy.models.dinov2 import rename_dinov2_keys
from hgdeploy.models.hf_depth import WRAPPERS, DepthAnythingDepth, HFDepth
from hgdeploy.spans.vit import insert_span

# Image processors: Intel/dpt-large and Intel/dpt-hybrid-midas preprocessor_config.json have
# image_mean = image_std = [0.5, 0.5, 0.5] and resample 2 (PIL bilinear);
# LiheYoung/depth-anything-small-hf has ImageNet mean/std and resample 3 (PIL bicubic).
PREPROCESS = {"dpt": ("bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "depth_anything": ("bicubic", None, None)}

# model.arch -> the published config.json values (DPTConfig / DepthAnythingConfig keyword arguments).
ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    "dpt": {
        # Intel/dpt-hybrid-midas: ViT-B/16 on a BiT ResNet-50 stem (stages 3-4-9); the neck reads 2 ResNet stages
        # and blocks 9, 12. From its config.json (as mirrored in sd2-community/stable-diffusion-2-depth/
        # depth_estimator) and transformers' convert_dpt_hybrid_to_pytorch.py.
        "dpt-hybrid-midas": {
            "is_hybrid": True, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "image_size": 384, "patch_size": 16, "backbone_out_indices": [2, 5, 8, 11],
            "backbone_featmap_shape": [1, 1024, 24, 24], "neck_ignore_stages": [0, 1],
            "reassemble_factors": [1, 1, 1, 0.5], "neck_hidden_sizes": [256, 512, 768, 768], "fusion_hidden_size": 256,
            "readout_type": "project", "use_batch_norm_in_fusion_residual": False, "qkv_bias": True,
            "layer_norm_eps": 1e-12,
            "backbone_config": {"model_type": "bit", "layer_type": "bottleneck", "depths": [3, 4, 9],
                                "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64, "global_padding": "SAME",
                                "embedding_dynamic_padding": True, "out_features": ["stage1", "stage2", "stage3"]},
        },
        # Intel/dpt-large (huggingface.co/Intel/dpt-large/blob/main/config.json): ViT-L/16, the neck reads blocks
        # 6, 12, 18, 24.
        "dpt-large": {
            "is_hybrid": False, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
            "intermediate_size": 4096, "image_size": 384, "patch_size": 16, "backbone_out_indices": [5, 11, 17, 23],
            "neck_hidden_sizes": [256, 512, 1024, 1024], "reassemble_factors": [4, 2, 1, 0.5], "fusion_hidden_size": 256,
            "readout_type": "project", "use_batch_norm_in_fusion_residual": False, "qkv_bias": True,
            "layer_norm_eps": 1e-12,
        },
    },
    "depth_anything": {
        # LiheYoung/depth-anything-small-hf (its config.json): DINOv2 ViT-S/14, the neck reads blocks 9-12; the
        # other Dinov2Config defaults apply (12 layers, mlp_ratio 4, layerscale 1.0, layer_norm_eps 1e-6,
        # apply_layernorm true). Depth-Anything-V2-Small-hf differs: out_indices [3, 6, 9, 12].
        "small": {
            "patch_size": 14, "reassemble_hidden_size": 384, "reassemble_factors": [4, 2, 1, 0.5],
            "neck_hidden_sizes": [48, 96, 192, 384], "fusion_hidden_size": 64, "head_hidden_size": 32,
            "depth_estimation_type": "relative",
            "backbone_config": {"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 6,
                                "num_hidden_layers": 12, "image_size": 518, "patch_size": 14,
                                "out_indices": [9, 10, 11, 12], "reshape_hidden_states": False},
        },
    },
}

# The test models: the same code paths in miniature, reads strictly inside the layer range.
TINY: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    # DPT-hybrid: 1-1-1 BiT stages (8/16/32 ch), ViT 64 wide x 4 layers, reads blocks 2 and 4; 128x128.
    "dpt": ({
        "is_hybrid": True, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 128, "image_size": 128, "patch_size": 16, "backbone_out_indices": [0, 0, 1, 3],
        "backbone_featmap_shape": [1, 32, 8, 8], "reassemble_factors": [1, 1, 1, 0.5],
        "neck_hidden_sizes": [8, 16, 32, 32], "fusion_hidden_size": 16, "readout_type": "project",
        "backbone_config": {"model_type": "bit", "layer_type": "bottleneck", "depths": [1, 1, 1],
                            "hidden_sizes": [8, 16, 32, 64], "embedding_size": 8, "num_groups": 2,
                            "global_padding": "SAME", "embedding_dynamic_padding": True,
                            "out_features": ["stage1", "stage2", "stage3"]},
    }, (128, 128)),
    # Depth Anything: DINOv2 64 wide x 6 layers reading blocks 3..6 at 112x112 (8x8 tokens).
    "depth_anything": ({
        "patch_size": 14, "reassemble_hidden_size": 64, "neck_hidden_sizes": [8, 16, 32, 64],
        "fusion_hidden_size": 16, "head_hidden_size": 8,
        "backbone_config": {"model_type": "dinov2", "hidden_size": 64, "num_hidden_layers": 6,
                            "num_attention_heads": 4, "intermediate_size": 128, "image_size": 112, "patch_size": 14,
                            "out_indices": [3, 4, 5, 6], "reshape_hidden_states": False},
    }, (112, 112)),
}
# Position embeddings of the tiny models: tokens then differ by squared distances ~ 2 * 64 * 4^2 = 2048,
# so even the plan's default tau = 50 assigns each token to its own cell at zero reduction
# (softmax weight of any other centre ~ exp(-2048 / 50)) and identity holds to float error.
POSITION_STD = 4.0


def hf_class(family: str) -> type[nn.Module]:
    from transformers import DepthAnythingForDepthEstimation, DPTForDepthEstimation

    return {"dpt": DPTForDepthEstimation, "depth_anything": DepthAnythingForDepthEstimation}[family]


def config_class(family: str) -> Any:
    from transformers import DepthAnythingConfig, DPTConfig

    return {"dpt": DPTConfig, "depth_anything": DepthAnythingConfig}[family]


def make_config(family: str, values: dict[str, Any]) -> Any:
    return config_class(family)(**copy.deepcopy(values))


def arch_config(family: str, arch: Any) -> Any:
    archs = ARCHS[family]
    if arch not in archs:
        raise UserError(f"model.arch={arch!r} is not a {family} architecture; use one of: {', '.join(archs)}")
    return make_config(family, archs[arch])


def fingerprint(family: str, config: Any) -> hf_folder.Fingerprint:
    """The architecture facts a checkpoint and a named arch must agree on."""
    if family == "dpt":
        return {"is_hybrid": config.is_hybrid, "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers}
    b = config.backbone_config
    return {"hidden_size": b.hidden_size, "num_hidden_layers": b.num_hidden_layers, "out_indices": list(b.out_indices)}


# ----------------------------------------------------------------------------------------------
# Checkpoints: the folders save_pretrained writes.

def read_config(family: str, folder: Path) -> Any:
    """The model's config from folder/config.json only (never the hub); its model_type must be the family's."""
    config = hf_folder.read_config(folder, WRAPPERS[family].model_type, config_class(family), family)
    check_supported(family, config, folder / "config.json")
    return config


def check_supported(family: str, config: Any, where: Path) -> None:
    """Refuse the configurations our forward does not reproduce (it would silently compute something else)."""
    if family == "dpt":
        if config.backbone_config is not None and not config.is_hybrid:
            raise UserError(f"{where}: DPT with a {config.backbone_config.model_type} backbone is not supported; "
                            f"the dpt family covers the ViT (dpt-large) and hybrid (dpt-hybrid-midas) encoders")
        indices = config.backbone_out_indices
        if not all(0 <= i < config.num_hidden_layers for i in indices):
            raise UserError(f"{where}: backbone_out_indices {list(indices)} must lie in 0..{config.num_hidden_layers - 1}")
        return
    b = config.backbone_config
    if b is None or b.model_type != "dinov2" or b.reshape_hidden_states:
        raise UserError(f"{where}: Depth Anything is supported with its DINOv2 backbone (reshape_hidden_states "
                        f"false) only")
    if b.use_swiglu_ffn:
        raise UserError(f"{where}: DINOv2 with SwiGLU MLPs (the giant backbone) is not supported: its saved weights "
                        f"need transformers' fused-MLP conversion; use the small, base or large model")


def load_weights(model: HFDepth, folder: Path) -> None:
    state, source = hf_folder.read_folder_weights(folder)
    if isinstance(model, DepthAnythingDepth):  # its DINOv2 backbone is saved under the old attention names
        state = rename_dinov2_keys(state, set(model.hf.state_dict()))
    load_state_strict(model.hf, state, source)


# ----------------------------------------------------------------------------------------------
# The Family callables.

def build(family: str, config: Any, input_size: tuple[int, int]) -> HFDepth:
    model = WRAPPERS[family](hf_class(family)(config).eval(), input_size)
    check_patch_multiple(input_size, model.patch_size)
    return model.eval()


def load_depth(family: str, checkpoint: str | None, input_size: tuple[int, int], options: Section) -> HFDepth:
    """A save_pretrained folder, or model.arch with random weights (seed 0) when there is no checkpoint."""
    arch = options.get("arch")
    if checkpoint is None:
        if arch is None:
            raise UserError(f"family {family} needs model.checkpoint (a save_pretrained folder) or model.arch "
                            f"(one of: {', '.join(ARCHS[family])}) for random weights")
        config = arch_config(family, arch)
        torch.manual_seed(0)
        return build(family, config, input_size)
    folder = hf_folder.checkpoint_folder(checkpoint)
    config = read_config(family, folder)
    if arch is not None and fingerprint(family, arch_config(family, arch)) != fingerprint(family, config):
        raise UserError(f"{folder}/config.json ({fingerprint(family, config)}) is not model.arch={arch!r} "
                        f"({fingerprint(family, arch_config(family, arch))}); drop model.arch or fix it")
    model = build(family, config, input_size)
    load_weights(model, folder)
    return model.eval()


def patch_depth(model: nn.Module, plan: ClusterPlan) -> nn.Module:
    """Clusters after plan.alpha blocks, reconstructs after plan.reconstruct_after; the class token rides along."""
    if not isinstance(model, HFDepth):
        raise UserError(f"the hf_depth adapter patches models it loaded, got {type(model).__name__}")
    model.encoder().layer = insert_span(model.layers, plan, num_prefix_tokens=1)
    return model


def depth_facts(model: nn.Module) -> ModelFacts:
    resize, mean, std = PREPROCESS[model.model_type]
    pre = Preprocess(model.input_size, resize) if mean is None else Preprocess(model.input_size, resize, mean, std)
    return ModelFacts(token_grid=model.token_grid(), depth=len(model.layers), preprocess=pre, head_reads=model.reads())


def tiny(family: str) -> tuple[HFDepth, tuple[int, int]]:
    values, size = TINY[family]
    return _randomised(build(family, make_config(family, values), size)), size


def _randomised(model: HFDepth) -> HFDepth:
    """Re-draw the weights with torch's default layer init (seed 0).

    HF's init (normal, std 0.02; zero position embeddings and class token) shrinks a tiny random
    model's depth map to ~1e-8, where any absolute comparison passes; torch's fan-in scaled init
    keeps it of order one, and random position embeddings make the tokens position-dependent and far
    apart (see POSITION_STD).
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.hf.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()
        for name, p in model.hf.named_parameters():
            if name.endswith(("position_embeddings", "cls_token")):
                p.normal_(0.0, POSITION_STD)
    return model.eval()


def _family(name: str, summary: str, depth_output: str) -> Family:
    """depth_output "disparity": transformers' DPT and Depth Anything heads output (relative) inverse depth;
    the DPT authors' metric NYUv2/KITTI models turn it into metres outside the network (depth = 1 / (scale x
    output + shift)), which their recipes' [eval] states."""
    load: Callable[[str | None, tuple[int, int], Section], HFDepth] = (
        lambda checkpoint, input_size, options: load_depth(name, checkpoint, input_size, options))
    return Family(name=name, summary=summary, outputs=(("depth", "depth"),), load=load, patch=patch_depth,
                  facts=depth_facts, tiny=lambda: tiny(name), write_checkpoint=hf_folder.write_checkpoint,
                  options=("arch",), depth_output=depth_output)


DPT = _family("dpt", "DPT depth (transformers DPTForDepthEstimation): ViT-L or hybrid ResNet-50+ViT-B; "
                     "save_pretrained folder", "disparity")
DEPTH_ANYTHING = _family("depth_anything", "Depth Anything (transformers DepthAnythingForDepthEstimation), DINOv2 "
                                           "backbone; save_pretrained folder", "disparity")
