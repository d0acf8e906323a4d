"""What a command that needs the PyTorch models works on: its recipe, engine profile, photos and export folder
(each read and checked by the command line before any work) and the models loaded and patched from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from hgdeploy.backends import EngineProfile
from hgdeploy.core import progress
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject
from hgdeploy.core.recipe import Recipe
from hgdeploy.families.catalogue import get_family
from hgdeploy.graph.folder import ExportFolder
from hgdeploy.layers import TokenClustering
from hgdeploy.measure.images import Photo, load_photos, to_batch
from hgdeploy.measure.results import RecipeInfo, Report, Weights
from hgdeploy.patch.models import Models, build_models

STRUCTURE_ONLY = ("random weights: these figures only show that the patched graph runs and stays close to "
                  "the unpatched one; they say nothing about a trained model (give --set model.checkpoint=...)")


@dataclass(frozen=True)
class Context:
    """The recipe's models, loaded and patched for one engine profile, with the photos they run on and, for a
    command that reads one, the export folder they match."""

    recipe: Recipe
    engine: EngineProfile
    models: Models
    photos: tuple[Photo, ...] = ()
    export: ExportFolder | None = None

    @cached_property
    def batch(self) -> torch.Tensor:
        if not self.photos:
            raise UserError("no images to run on")
        return to_batch(list(self.photos), self.models.preprocess)

    @property
    def example(self) -> torch.Tensor:
        """The input graphs are exported and timed at: model.batch images, the photos from the first (again from
        the first when there are fewer), or zeros without photos."""
        if self.photos:
            return self.batch[[i % len(self.batch) for i in range(self.recipe.batch)]]
        return torch.zeros(self.recipe.batch, 3, *self.models.preprocess.size)

    def feeds(self) -> list[dict[str, np.ndarray]]:
        """Every photo once, model.batch at a time (the last batch filled up from the first photos)."""
        n, total = self.recipe.batch, len(self.batch)
        return [{INPUT_NAME: self.batch[[(i + j) % total for j in range(n)]].numpy()} for i in range(0, total, n)]

    @property
    def pretrained(self) -> bool:
        return bool(self.recipe.checkpoint)

    def weights(self) -> Weights:
        return Weights(self.recipe.checkpoint, self.pretrained, weights_source(self.recipe))

    def describe(self) -> Report:
        """What every command reports: recipe, weights, plan (with the clustering form and why), preprocessing.
        Its JSON is also what an export records in its graphs."""
        layers = [m for m in self.models.patched.modules() if isinstance(m, TokenClustering)]
        forms: JsonObject = {"clustering_form": ",".join(sorted({m.form for m in layers})),
                             "clustering_form_reason": "; ".join(sorted({m.form_reason for m in layers}))} if layers else {}
        auto: JsonObject = {"tau_auto": self.models.tau_auto} if self.models.tau_auto else {}
        return Report(recipe=RecipeInfo(self.recipe.name, self.recipe.path, self.recipe.data), weights=self.weights(),
                      plan=self.models.plan.to_dict() | forms | auto,
                      preprocess=dataclasses.asdict(self.models.preprocess))


def weights_source(recipe: Recipe) -> str:
    """Where the weights come from, in words."""
    if recipe.checkpoint:
        return f"checkpoint {recipe.checkpoint}"
    return "random weights (seed 0), no checkpoint given"


def check_engine_outputs(recipe: Recipe, engine: EngineProfile) -> None:
    """A profile's per-output parity bounds must name outputs of the recipe's family: checked before minutes of
    loading and exporting."""
    family = get_family(recipe.family)
    unknown = engine.unknown_outputs(family.output_names)
    if unknown:
        raise UserError(f"{engine.path}: parity.max_abs_per_output.{unknown[0]} is not an output of family "
                        f"{family.name} (its outputs: {', '.join(family.output_names)})")


def load_context(recipe: Recipe, engine: EngineProfile, photos: list[Photo] | None = None,
                 export: ExportFolder | None = None) -> Context:
    """Load and patch the recipe's model for the profile's device (or, reading an export, the device it was
    planned for, so that PyTorch matches its graphs). tau = "auto": the value the export recorded, else
    calibrated on `photos` (the bundled samples without them)."""
    device = engine.device
    recorded = export.recorded_plan if export is not None else {}
    planned = recorded.get("device") or device
    if planned != device:
        progress.info(f"note: {export.path if export else ''} was planned for the {planned}; the PyTorch reference "
                      f"is patched the same way so that it matches the graphs (for a {device} plan: hgdeploy export "
                      f"--engine {engine.name} --out {export.path if export else ''})")
        device = planned
    with progress.step(f"Loading {recipe.family} ({weights_source(recipe)}) and patching for the {device}"):
        models = build_models(recipe, device, lambda pre: to_batch(photos or load_photos(None), pre),
                              recorded.get("tau") if recipe.request.tau_auto else None)
    return Context(recipe, engine, models, tuple(photos or ()), export)
