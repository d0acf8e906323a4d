"""Model families as data: what to load, how to patch, what the outputs mean.

One frozen record per family in a registry that refuses duplicates; tests are parametrised
from it. Model-specific code lives in the adapter modules the records point at.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from hgdeploy.errors import UserError
from hgdeploy.plan import ClusterPlan
from hgdeploy.recipe import Preprocess, Recipe

# What an output is, so checks know how to compare it: "tokens" [B, N, C]; "heatmap" [B, 1, H, W]
# probabilities in [0, 1]; "segmentation" [B, K, H, W] class logits; "depth" [B, H, W];
# "classification" [B, K] class logits.
OUTPUT_KINDS = ("tokens", "heatmap", "segmentation", "depth", "classification")


@dataclass(frozen=True)
class Family:
    """A model family the toolkit can patch.

    load(checkpoint, input_size, options) -> eval-mode nn.Module whose forward(pixel_values) returns
    a tuple of tensors named by `outputs`; `options` are the recipe's other [model] keys, limited to
    `options`. patch(model, plan) -> the patched model (it may modify `model`: callers pass a copy).
    token_grid, depth and reads look at the loaded model: reads are the layer counts whose outputs a
    head consumes (a neck reading intermediate layers), which a plan must not cluster across.
    write_checkpoint(model, folder) writes the checkpoint layout users have (tests round-trip it);
    tiny() builds a small randomly initialised model of the family and its input size for tests.
    """

    name: str
    summary: str
    outputs: tuple[tuple[str, str], ...]  # (output name, kind)
    load: Callable[[str | None, tuple[int, int], dict[str, Any]], nn.Module]
    patch: Callable[[nn.Module, ClusterPlan], nn.Module]
    token_grid: Callable[[nn.Module], tuple[int, int]]
    depth: Callable[[nn.Module], int]
    tiny: Callable[[], tuple[nn.Module, tuple[int, int]]]
    write_checkpoint: Callable[[nn.Module, Path], Path] | None = None
    reads: Callable[[nn.Module], tuple[int, ...]] | None = None
    options: tuple[str, ...] = ()
    reconstruct_on: tuple[str, ...] = ("features",)
    preprocess: Callable[[nn.Module, tuple[int, int]], Preprocess] = field(
        default=lambda model, size: Preprocess(size))

    def head_reads(self, model: nn.Module) -> tuple[int, ...]:
        """Layer counts whose outputs the head reads; by default only the last layer's."""
        return self.reads(model) if self.reads else (self.depth(model),)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} is already registered")
    for _, kind in family.outputs:
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"family {family.name}: unknown output kind {kind!r}")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> Family:
    _load_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown model.family {name!r}; known families: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def families() -> list[Family]:
    _load_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin() -> None:
    from hgdeploy.adapters import builtin  # noqa: F401  (registers on import)


@dataclass(frozen=True)
class Models:
    """The unpatched model, its patched copy and the plan that links them."""

    family: Family
    baseline: nn.Module
    patched: nn.Module
    plan: ClusterPlan
    preprocess: Preprocess


def check_options(family: Family, options: dict[str, Any]) -> None:
    """Refuse [model] keys the family does not use: a silently ignored key is a wrong model."""
    unused = sorted(set(options) - set(family.options))
    if unused:
        accepted = ", ".join(f"model.{k}" for k in family.options) or "none"
        raise UserError(f"model.{unused[0]} does not apply to family {family.name} (it accepts: {accepted})")


def default_reconstruct_after(reads: tuple[int, ...], alpha: int, depth: int) -> int:
    """The first layer count after alpha whose output a head reads: clusters cannot reach a head."""
    later = [r for r in sorted(reads) if r > alpha]
    return later[0] if later else depth


def check_reads(plan: ClusterPlan, reads: tuple[int, ...], family: str) -> None:
    """A head reading a layer between clustering and reconstruction would get cluster tokens."""
    inside = [r for r in sorted(reads) if plan.alpha < r < plan.reconstruct_after]
    if inside:
        raise UserError(
            f"{family}: the head reads the output of layer {inside[0]} (1-based), which lies between clustering "
            f"(after layer {plan.alpha}) and reconstruction (after layer {plan.reconstruct_after}); set "
            f"cluster.reconstruct_after to at most {inside[0]} or move cluster.alpha to {inside[0]} or later")


def build_models(recipe: Recipe) -> Models:
    """Load the recipe's checkpoint, validate its plan against the model, patch a copy."""
    family = get_family(recipe.family)
    check_options(family, recipe.options)
    baseline = family.load(recipe.checkpoint, recipe.input_size, recipe.options).eval()
    depth, reads = family.depth(baseline), family.head_reads(baseline)
    default_after = default_reconstruct_after(reads, recipe.data["cluster"]["alpha"], depth)
    plan = recipe.plan(family.token_grid(baseline), depth, default_after)
    if plan.reconstruct_on not in family.reconstruct_on:
        raise UserError(f"cluster.reconstruct_on={plan.reconstruct_on!r} is not supported by family {family.name} "
                        f"(supported: {', '.join(family.reconstruct_on)})")
    check_reads(plan, reads, family.name)
    patched = family.patch(copy.deepcopy(baseline), plan)
    preprocess = recipe.preprocess(family.preprocess(baseline, recipe.input_size))
    return Models(family, baseline, patched.eval(), plan, preprocess)
