"""A patched copy of a loaded model that shares its weights: cheap enough to make once per plan of a sweep."""

from __future__ import annotations

import copy
import itertools

from torch import nn

from hgdeploy.core.plan import ClusterPlan, ModelFacts, PlanRequest, make_plan
from hgdeploy.families.registry import Family


def patch_for(family: Family, baseline: nn.Module, facts: ModelFacts, request: PlanRequest,
              device: str) -> tuple[ClusterPlan, nn.Module]:
    """The plan for `request` (tau a number) on this loaded model and a patched copy sharing its weights."""
    plan = make_plan(request, facts, family.name, family.reconstruct_on, device)
    return plan, family.patch(structural_copy(baseline), plan).eval()


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares its parameter and buffer tensors with `model`.

    Patching changes the structure, never a weight; a second copy of a ViT-H's 2.5 GB of weights is what
    a large model (and a 2-core CI machine) cannot afford.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)
