"""Recipe -> loaded, planned and patched models: the one road from a recipe to what gets exported.

The family loads the model and states its facts once; `plan.make_plan` joins them with the
recipe's [cluster] request; the family patches a copy. Nothing here reads the recipe's raw TOML.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from torch import nn

from hgdeploy.adapters.catalogue import get_family
from hgdeploy.adapters.registry import Family
from hgdeploy.plan import ClusterPlan, make_plan
from hgdeploy.preprocess import Preprocess
from hgdeploy.recipe import Recipe


@dataclass(frozen=True)
class Models:
    """The unpatched model, its patched copy and the plan that links them."""

    family: Family
    baseline: nn.Module
    patched: nn.Module
    plan: ClusterPlan
    preprocess: Preprocess


def build_models(recipe: Recipe, device: str = "cpu") -> Models:
    """Load the recipe's checkpoint, make its plan for that model on `device` ("cpu"/"gpu"), patch a copy."""
    family = get_family(recipe.family)
    family.check_options(recipe.options)
    baseline = family.load(recipe.checkpoint, recipe.input_size, recipe.options).eval()
    facts = family.facts(baseline)
    plan = make_plan(recipe.request, facts, family.name, family.reconstruct_on, device)
    patched = family.patch(structural_copy(baseline), plan).eval()
    return Models(family, baseline, patched, plan, recipe.preprocess(facts.preprocess))


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares its parameter and buffer tensors with `model`.

    Patching changes the structure, never a weight; a second copy of a ViT-H's 2.5 GB of weights is what
    a large model (and a 2-core CI machine) cannot afford.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)
