"""`hgdeploy tune`: the fastest plan that keeps the user's quality budget, measured on their device.

The parts: `space` (what to sweep, the budget), `ledger` (typed rows, tune.json, resume), `score` (fidelity
of every plan and of the baselines, in PyTorch, cheap), `select` (the rules: within budget, what to time,
the best plan, matched baselines), `latency` (the chosen rows on the export road, timed interleaved with the
unpatched model), `report` (tune.md, tune.png, best.toml). This module reads the settings and runs the parts
in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from hgdeploy.backends import EngineProfile
from hgdeploy.core import progress
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject, JsonValue
from hgdeploy.core.recipe import Recipe
from hgdeploy.families.catalogue import get_family
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.measure.images import Photo
from hgdeploy.measure.report import speedup_text
from hgdeploy.pipeline.context import STRUCTURE_ONLY, Context, load_context
from hgdeploy.pipeline.steps import backend_info
from hgdeploy.tune.latency import latency_phase
from hgdeploy.tune.ledger import Ledger, Unpatched, earlier
from hgdeploy.tune.report import write_results
from hgdeploy.tune.score import Scorer, downscale_phase, fidelity_phase, holdout, pool_phase
from hgdeploy.tune.select import matched, select_best
from hgdeploy.tune.space import Budget, Space, check_budget_metric, default_space, parse_budget, read_space

DEFAULT_TIME_LIMIT = 30.0


TUNE_FOLDER = "tune"  # runs/<recipe>/tune by default


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a sweep must keep and how long it may take, read from the command line before any model."""

    budget: Budget
    space: JsonObject
    limit_s: float
    holdout: list[Photo] | None = None


def settings(budget_text: str, confidence: float, space_file: str | None, time_limit: float | None) -> Settings:
    """--budget, --confidence, --space and --time-limit, each checked."""
    budget = parse_budget(budget_text, confidence)
    space_values = read_space(space_file) if space_file else {}
    limit_s = 60.0 * (DEFAULT_TIME_LIMIT if time_limit is None else time_limit)
    if limit_s <= 0:
        raise UserError(f"--time-limit {time_limit} must be a positive number of minutes")
    return Settings(budget, space_values, limit_s)


def check_tunable(recipe: Recipe) -> None:
    if not get_family(recipe.family).tunable:
        raise UserError(f"hgdeploy tune does not sweep family {recipe.family} yet (window clustering); compare plans "
                        f"with `hgdeploy flops` and `hgdeploy check --set cluster.grid=...`")


def fingerprint(photos: list[Photo]) -> list[JsonValue]:
    return [{"name": p.name, "sha256": hashlib.sha256(p.image.tobytes()).hexdigest()[:16]} for p in photos]


def start_ledger(ctx: Context, budget: Budget, space: Space, photos: list[Photo],
                 folder: Path) -> tuple[Ledger, Ledger | None]:
    """A new ledger for this run, and the earlier run's in `folder` when it tuned the same thing (to resume)."""
    context: JsonObject = {"recipe": ctx.recipe.name, "values": ctx.recipe.data, "images": fingerprint(photos),
                           "engine": ctx.engine.name}
    old = earlier(folder, context)
    ledger = Ledger(context=context, budget=budget, space=space.to_dict(), backend=backend_info(ctx), folder=folder,
                    resumed_rows=len(old.rows) if old else 0,
                    downscale_gflops=dict(old.downscale_gflops) if old else {})
    ledger.baseline = Unpatched(count_gflops_fast(ctx.models.baseline, ctx.example).total,
                                old.baseline.latency_ms if old and old.baseline else None)
    return ledger, old


def sweep(scorer: Scorer, settings: Settings) -> None:
    """The phases in order: fidelity of every plan and baseline, then the latency of the chosen rows."""
    ctx, ledger, space = scorer.ctx, scorer.ledger, scorer.space
    upto = max([a for a in space.alpha if a < ctx.models.facts.depth] + [ctx.models.plan.alpha])
    cache = scorer.cache(ctx.batch, upto)
    metrics = [k for k in scorer.score(cache, cache.outputs)
               if k not in ("images", "per_image") and not k.endswith("_undefined")]
    check_budget_metric(settings.budget, metrics)
    if not ctx.pretrained:
        ledger.structure_check_only = STRUCTURE_ONLY
        progress.info(f"note: {STRUCTURE_ONLY}")
    fidelity_phase(scorer, cache)
    pool_phase(scorer, cache)
    downscale_phase(scorer, cache)
    del cache
    latency_phase(ctx, ledger, scorer.models_for, space.timed, settings.limit_s)


def tune(recipe: Recipe, engine: EngineProfile, photos: list[Photo], settings: Settings, folder: Path) -> Ledger:
    """`hgdeploy tune`: the sweep, its inputs checked by the command line; the ledger tune.json holds."""
    ctx = load_context(recipe, engine, photos)
    space = dataclasses.replace(default_space(ctx.models.facts, recipe.request, ctx.models.plan.device),
                                **settings.space)
    ledger, old = start_ledger(ctx, settings.budget, space, photos, folder)
    if old:
        progress.info(f"Resuming: {len(old.rows)} plans of the earlier run in {folder}/tune.json are reused")
    scorer = Scorer(ctx, space, ledger, {r.key: r for r in old.rows} if old else {}, settings.limit_s)
    try:
        sweep(scorer, settings)
    except KeyboardInterrupt:
        ledger.state = "interrupted"
        ledger.save()
        progress.info(f"interrupted: the {len(ledger.rows)} plans measured so far are in {folder}/tune.json; "
                      f"run the same command again to resume")
        raise
    ledger.state = "stopped at --time-limit" if ledger.stopped else "done"
    ledger.best = select_best(ledger.rows, settings.budget)
    if ledger.best is not None and settings.holdout:
        ledger.best.holdout = holdout(scorer, ledger.best, settings.holdout)
    ledger.comparison = matched(ledger.rows, settings.budget)
    write_results(ledger, recipe.data, header(ledger, len(photos)))
    return ledger


def header(ledger: Ledger, images: int) -> list[str]:
    """best.toml's first lines: where it comes from and what it measured."""
    budget, best = ledger.budget, ledger.best
    return [f"Tuned by hgdeploy tune from recipe {ledger.context['recipe']} for {ledger.context['engine']}, budget "
            f"{budget}, on {images} images.",
            f"Measured speed-up {speedup_text(best.speedup, best.speedup_ci, 3)}, {budget.key} "
            f"{(best.fidelity or {})[budget.key]:.4f}."
            if best and best.speedup else "No plan was within the budget and faster."]
