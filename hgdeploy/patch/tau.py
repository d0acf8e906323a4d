"""`cluster.tau = "auto"`, the one calibration: the temperature read off the tokens that enter the clustering layer
of a probe copy (`layers.calibrate_tau`). Commands get the tokens by running the model on photos; tune replays
them from its cache of the unpatched model's first blocks."""

from __future__ import annotations

import torch
from torch import nn

from hgdeploy.core.files import JsonObject
from hgdeploy.core.plan import ModelFacts, PlanRequest
from hgdeploy.families.registry import Family
from hgdeploy.layers import TAU_SHARPNESS, TokenClustering, calibrate_tau, sharpness
from hgdeploy.patch.patched import patch_for


def probe(family: Family, baseline: nn.Module, request: PlanRequest, facts: ModelFacts,
          device: str) -> tuple[nn.Module, TokenClustering]:
    """A patched copy at tau 1 (the temperature does not change the tokens entering the layer) and its
    clustering layer."""
    _, model = patch_for(family, baseline, facts, request.with_tau(1.0), device)
    return model, next(m for m in model.modules() if isinstance(m, TokenClustering))


def tau_from_tokens(layer: TokenClustering, tokens: torch.Tensor, source: str) -> tuple[float, JsonObject]:
    """tau for `layer` from the tokens entering it, and how it was found (what reports show as tau_auto)."""
    tau = calibrate_tau(layer, tokens)
    with torch.no_grad():
        reached = sharpness(layer.initial_distances(tokens), tau)
    return tau, {"tau": tau, "source": source, "target_sharpness": TAU_SHARPNESS, "sharpness": reached}


class _Captured(Exception):
    """Raised by the calibration hook: the layers after alpha need not run."""


def tokens_entering(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens that reach `layer` when `model` runs on each image ([B * N, C] rows stacked by image)."""
    tokens: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        tokens.append(inputs[0].detach())
        raise _Captured

    handle = layer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for i in range(images.shape[0]):
                try:
                    model(images[i:i + 1])
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(tokens)


def calibrate(family: Family, baseline: nn.Module, request: PlanRequest, facts: ModelFacts, device: str,
              images: torch.Tensor) -> tuple[float, JsonObject]:
    """tau from the model's own tokens entering the clustering layer, on `images`."""
    model, layer = probe(family, baseline, request, facts, device)
    tau, info = tau_from_tokens(layer, tokens_entering(model, layer, images),
                                f"calibrated on {images.shape[0]} images")
    return tau, info | {"images": int(images.shape[0])}
