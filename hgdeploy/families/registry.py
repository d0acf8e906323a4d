"""Model families as data: what to load, how to patch, what the outputs mean.

One frozen record per family; a `Registry` refuses duplicates (a second family of one name is a
bug, never an override). Which families ship is listed in `catalogue.py`; model-specific code lives
in the adapter modules the records point at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from torch import nn

from hgdeploy.core.contract import OUTPUT_KINDS
from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, ModelFacts
from hgdeploy.core.recipe import Section

INFERENCE_MODES = ("resize", "slide")
DEPTH_OUTPUTS = ("metric", "disparity")


@dataclass(frozen=True)
class Family:
    """A model family the toolkit can patch.

    load(checkpoint, input_size, options) -> eval-mode nn.Module whose forward(pixel_values) returns
    a tuple of tensors named by `outputs`; `options` are the recipe's other [model] keys, limited to
    `options`. facts(model) states what the loaded model is (token grid, depth, the layers its head
    reads, its preprocessing). patch(model, plan) -> the patched model (it may modify `model`: callers
    pass a copy). reconstruct_on: the placements of the reconstruction the family supports.
    write_checkpoint(model, folder) writes the checkpoint layout users have (tests round-trip it);
    tiny() builds a small randomly initialised model of the family and its input size for tests.
    inference: how `hgdeploy eval` runs it on a dataset image of any size: "resize" (to the input size, the
    output resized back bilinearly) or "slide" (short side resized to the window, windows of the input
    size, logits averaged where they overlap: Segmenter's own test-time inference). depth_output: what a
    depth output is, "metric" (metres) or "disparity" (relative inverse depth); a recipe's [eval] may say
    otherwise for its weights. parts: (label, submodule path) pairs `hgdeploy flops` also counts on their own
    (Mask2Former's backbone: the authors publish its FLOPs alone). tunable: `hgdeploy tune` can sweep its plans
    (it replays the blocks of a plain-ViT span; window spans are not swept yet). classes(checkpoint, options):
    the number of classes its segmentation output predicts, read from the recipe and a checkpoint's own
    description (variant.yml, config.json) without loading weights, so that `hgdeploy eval` refuses a dataset of
    another class count before any work; None where a family cannot tell (eval then checks the loaded model).
    """

    name: str
    summary: str
    outputs: tuple[tuple[str, str], ...]  # (output name, kind)
    load: Callable[[str | None, tuple[int, int], Section], nn.Module]
    patch: Callable[[nn.Module, ClusterPlan], nn.Module]
    facts: Callable[[nn.Module], ModelFacts]
    tiny: Callable[[], tuple[nn.Module, tuple[int, int]]]
    write_checkpoint: Callable[[nn.Module, Path], Path] | None = None
    options: tuple[str, ...] = ()
    reconstruct_on: tuple[str, ...] = ("features",)
    inference: str = "resize"
    depth_output: str = "metric"
    parts: tuple[tuple[str, str], ...] = ()
    tunable: bool = True
    classes: Callable[[str | None, Section], int | None] | None = None

    def __post_init__(self) -> None:
        for _, kind in self.outputs:
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"family {self.name}: unknown output kind {kind!r}")
        if self.inference not in INFERENCE_MODES or self.depth_output not in DEPTH_OUTPUTS:
            raise ValueError(f"family {self.name}: inference {self.inference!r} / depth_output {self.depth_output!r}")

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    def check_options(self, options: Section) -> None:
        """Refuse [model] keys the family does not use: a silently ignored key is a wrong model."""
        unused = sorted(set(options) - set(self.options))
        if unused:
            accepted = ", ".join(f"model.{k}" for k in self.options) or "none"
            raise UserError(f"model.{unused[0]} does not apply to family {self.name} (it accepts: {accepted})")


class Registry:
    """Families by name, refusing duplicates; iterates in name order."""

    def __init__(self, families: Iterable[Family] = ()):
        self._by_name: dict[str, Family] = {}
        for family in families:
            self.register(family)

    def register(self, family: Family) -> Family:
        if family.name in self._by_name:
            raise ValueError(f"model family {family.name!r} is already registered")
        self._by_name[family.name] = family
        return family

    def get(self, name: str) -> Family:
        if name not in self._by_name:
            raise UserError(f"unknown model.family {name!r}; known families: {', '.join(sorted(self._by_name))}")
        return self._by_name[name]

    def __iter__(self) -> Iterator[Family]:
        return iter([self._by_name[k] for k in sorted(self._by_name)])
