"""Recipe -> loaded, planned and patched models: the one road from a recipe to what gets exported.

The family loads the model and states its facts once; `plan.make_plan` joins them with the
recipe's [cluster] request; the family patches a copy. Nothing here reads the recipe's raw TOML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject
from hgdeploy.core.memory import freeze_imports
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.core.recipe import Recipe
from hgdeploy.families.catalogue import get_family
from hgdeploy.families.registry import Family
from hgdeploy.patch.patched import patch_for
from hgdeploy.patch.tau import calibrate


@dataclass(frozen=True)
class Models:
    """The unpatched model, its patched copy, the plan that links them and the facts it was made from (and, for
    tau = "auto", how tau was calibrated)."""

    family: Family
    baseline: nn.Module
    patched: nn.Module
    plan: ClusterPlan
    preprocess: Preprocess
    facts: ModelFacts
    tau_auto: JsonObject | None = None


def build_models(recipe: Recipe, device: str = "cpu", calibration: Callable[[Preprocess], torch.Tensor] | None = None,
                 tau: float | None = None) -> Models:
    """Load the recipe's checkpoint, make its plan for that model on `device` ("cpu"/"gpu"), patch a copy.

    tau = "auto" in the recipe: `tau` when given (the value an export recorded), else calibrated on the
    images `calibration(preprocess)` returns ([B, 3, H, W], prepared as the model expects) at layer alpha.
    """
    freeze_imports()
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
    return Models(family, baseline, patched, plan, preprocess, facts, calibrated)
