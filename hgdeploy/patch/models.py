"""Recipe -> loaded, planned and patched models: the one road from a recipe to what gets exported.

The family loads the model and states its facts once; `plan.make_plan` joins them with the
recipe's [cluster] request; the family patches a copy. Nothing here reads the recipe's raw TOML.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hgdeploy.families.catalogue import get_family
from hgdeploy.families.registry import Family
from hgdeploy.core.errors import UserError
from hgdeploy.layers import TAU_SHARPNESS, TokenClustering, calibrate_tau, sharpness
from hgdeploy.core.plan import ClusterPlan, ModelFacts, PlanRequest, make_plan
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.core.recipe import Recipe


@dataclass(frozen=True)
class Models:
    """The unpatched model, its patched copy and the plan that links them (and, for tau = "auto", how tau
    was calibrated)."""

    family: Family
    baseline: nn.Module
    patched: nn.Module
    plan: ClusterPlan
    preprocess: Preprocess
    tau_auto: dict[str, Any] | None = None


def build_models(recipe: Recipe, device: str = "cpu", calibration: Callable[[Preprocess], torch.Tensor] | None = None,
                 tau: float | None = None) -> Models:
    """Load the recipe's checkpoint, make its plan for that model on `device` ("cpu"/"gpu"), patch a copy.

    tau = "auto" in the recipe: `tau` when given (the value an export recorded), else calibrated on the
    images `calibration(preprocess)` returns ([B, 3, H, W], prepared as the model expects) at layer alpha.
    """
    family = get_family(recipe.family)
    family.check_options(recipe.options)
    baseline = family.load(recipe.checkpoint, recipe.input_size, recipe.options).eval()
    facts = family.facts(baseline)
    request, calibrated, preprocess = recipe.request, None, recipe.preprocess(facts.preprocess)
    if request.tau_auto and request.options.get("method") == "pool_bilinear":
        request, tau = request.with_tau(1.0), None  # pooling has no temperature
    elif request.tau_auto:
        if tau is None:
            if calibration is None:
                raise UserError('cluster.tau = "auto" needs images to calibrate on (pass --images DIR)')
            tau, calibrated = calibrate(family, baseline, request, facts, device, calibration(preprocess))
        else:
            calibrated = {"tau": tau, "source": "recorded by the export"}
        request = request.with_tau(tau)
    plan, patched = patch_for(family, baseline, facts, request, device)
    return Models(family, baseline, patched, plan, preprocess, calibrated)


def patch_for(family: Family, baseline: nn.Module, facts: ModelFacts, request: PlanRequest,
              device: str) -> tuple[ClusterPlan, nn.Module]:
    """The plan for `request` (tau a number) on this loaded model and a patched copy sharing its weights:
    cheap enough to do once per plan of a sweep."""
    plan = make_plan(request, facts, family.name, family.reconstruct_on, device)
    return plan, family.patch(structural_copy(baseline), plan).eval()


class _Captured(Exception):
    """Raised by the calibration hook: the layers after alpha need not run."""


def calibrate(family: Family, baseline: nn.Module, request: PlanRequest, facts: ModelFacts, device: str,
              images: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """tau from the model's own tokens entering the clustering layer, on `images` (layers.calibrate_tau)."""
    _, probe = patch_for(family, baseline, facts, request.with_tau(1.0), device)
    layer = next(m for m in probe.modules() if isinstance(m, TokenClustering))
    tokens: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        tokens.append(inputs[0].detach())
        raise _Captured

    handle = layer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for i in range(images.shape[0]):
                try:
                    probe(images[i:i + 1])
                except _Captured:
                    pass
    finally:
        handle.remove()
    z = torch.cat(tokens)
    tau = calibrate_tau(layer, z)
    with torch.no_grad():
        reached = sharpness(layer.initial_distances(z), tau)
    return tau, {"tau": tau, "source": f"calibrated on {images.shape[0]} images", "target_sharpness": TAU_SHARPNESS,
                 "sharpness": reached, "images": int(images.shape[0])}


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares its parameter and buffer tensors with `model`.

    Patching changes the structure, never a weight; a second copy of a ViT-H's 2.5 GB of weights is what
    a large model (and a 2-core CI machine) cannot afford.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)
