"""SwinV2 backbones (transformers' Swinv2Backbone): window token clustering in one stage, its four stage feature
maps as outputs (what a detector such as HTC++ reads).

The paper's SwinV2-L plan: window 32 -> 23 in stage 3, clustering after block 12 and reconstruction after block 22,
both counted over the whole network (2 + 2 + 18 + 2). There is no official code; the continuous position bias is
refitted as swin_windows.refit_layer says (the coordinate table rebuilt for the clustered window, the MLP shared).
SwinV2 fixes each stage's window at build time from config.image_size (a stage map smaller than the window
attends whole), so the config is built for the run's input size.
"""

from __future__ import annotations

from typing import Any

from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import Section
from hgdeploy.families.registry import Family
from hgdeploy.models import hf_folder
from hgdeploy.models.hf_windowed import Swinv2Features, randomised
from hgdeploy.spans.swin import patch_model, stage_facts

STAGES = ["stage1", "stage2", "stage3", "stage4"]
# model.arch -> Swinv2Config keyword arguments.
ARCHS = {
    # SwinV2-L (IN-22k pre-trained at 192 with windows 12) fine-tuned for COCO detection with windows of 32, as
    # the SwinV2 paper's HTC++ runs it: embed 192, depths 2 2 18 2, heads 6 12 24 48, pretrained windows 12 12 12 6
    "swinv2-large-coco": lambda: {"image_size": 1536, "embed_dim": 192, "depths": [2, 2, 18, 2],
                                  "num_heads": [6, 12, 24, 48], "window_size": 32,
                                  "pretrained_window_sizes": [12, 12, 12, 6], "out_features": STAGES},
}
TINY = {"image_size": 64, "embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 5,
        "pretrained_window_sizes": [4, 4, 4, 2], "out_features": STAGES}


def _classes() -> tuple[Any, Any]:
    from transformers import Swinv2Backbone, Swinv2Config

    return Swinv2Config, Swinv2Backbone


def _fitted(input_size: tuple[int, int]) -> Any:
    def fit(config: Any) -> Any:
        if input_size[0] != input_size[1]:
            raise UserError(f"swinv2: model.input_size {input_size[0]}x{input_size[1]} must be square (transformers' "
                            f"SwinV2 sizes every stage from one image_size)")
        config.image_size = input_size[0]
        config.out_features = STAGES
        return config
    return fit


def _fingerprint(config: Any) -> hf_folder.Fingerprint:
    return {"embed_dim": config.embed_dim, "depths": list(config.depths), "window_size": config.window_size}


def load(checkpoint: str | None, input_size: tuple[int, int], options: Section) -> Swinv2Features:
    config_class, model_class = _classes()
    hf = hf_folder.load_or_build("swinv2", checkpoint, options, ARCHS, "swinv2", config_class, model_class,
                                 _fitted(input_size), _fingerprint)
    return Swinv2Features(hf, input_size).eval()


def tiny() -> tuple[Swinv2Features, tuple[int, int]]:
    config_class, model_class = _classes()
    return Swinv2Features(randomised(model_class(config_class(**TINY))), (64, 64)).eval(), (64, 64)


FAMILY = Family(
    name="swinv2", summary="SwinV2 backbone (transformers Swinv2Backbone), four stage feature maps: window clustering "
                           "in one stage; save_pretrained folder",
    outputs=tuple((name, "features") for name in STAGES),
    load=load, patch=lambda model, plan: patch_model(model, plan, Swinv2Features, "swinv2"),
    facts=lambda model: stage_facts(model, "bicubic"), tiny=tiny, write_checkpoint=hf_folder.write_checkpoint,
    options=("arch",), tunable=False,
)
