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
import tempfile
import time
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
from hgdeploy.tune.clock import Clock
from hgdeploy.tune.latency import Bench, latency_phase
from hgdeploy.tune.ledger import Ledger, Unpatched, earlier
from hgdeploy.tune.report import remove_outputs, write_results
from hgdeploy.tune.score import (BASELINE_KINDS, Scorer, baseline_cost, baseline_phase, fidelity_phase, has_twin,
                                 holdout, input_sizes, recipe_phase, size_gflops)
from hgdeploy.tune.select import fits_cheapest, matched, must_count, select_best, to_time, twins
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
    started: float = dataclasses.field(default_factory=time.monotonic)  # the command's start: --time-limit counts


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


def start_ledger(ctx: Context, budget: Budget, space: Space, photos: list[Photo], folder: Path,
                 clock: Clock) -> Ledger:
    """The ledger of this run, holding the scored rows of an earlier run in `folder` that tuned the same thing
    (to resume: nothing it measured is measured again). The earlier run's tune.md, tune.png and best.toml
    concluded a run that is being resumed: they are removed, and this run writes its own at the end."""
    context: JsonObject = {"recipe": ctx.recipe.name, "values": ctx.recipe.data, "images": fingerprint(photos),
                           "engine": ctx.engine.name}
    old = earlier(folder, context)
    rows = [r for r in old.rows if r.reusable()] if old else []
    if old:
        clock.earlier = dict(old.costs)
    ledger = Ledger(context=context, budget=budget, space=space.to_dict(), backend=backend_info(ctx), folder=folder,
                    rows=rows, resumed_rows=len(rows), downscale_gflops=dict(old.downscale_gflops) if old else {},
                    clock=clock)
    ledger.baseline = Unpatched(count_gflops_fast(ctx.models.baseline, ctx.example).total,
                                old.baseline.latency_ms if old and old.baseline else None)
    removed = remove_outputs(folder)
    if old:
        timed = sum(1 for r in rows if r.speedup is not None)
        progress.info(f"Resuming: {len(rows)} rows of the earlier run in {folder}/tune.json ({timed} timed) are "
                      f"kept and not measured again" + (f"; its {', '.join(removed)} are removed until this run "
                                                        f"writes its own" if removed else ""))
        ledger.save()  # tune.json says at once that the removed conclusions are gone
    return ledger  # a new run's folder appears with its first measured row: a refused --budget leaves nothing


def must_reserve(scorer: Scorer, bench: Bench, final_s: float) -> float:
    """Seconds the fidelity phase leaves: the baselines of the cheapest plans within the budget (scored and
    timed), those plans' timing, the held-out check and the files. Counted on the ledger as it stands: a plan
    that may still come within the budget counts as one to time with its baselines."""
    ledger, space = scorer.ledger, scorer.space
    assert ledger.baseline is not None
    n = must_count(space.timed)
    fit = fits_cheapest(ledger.rows, ledger.budget, ledger.baseline.gflops)[:n]
    kinds = [k for k in BASELINE_KINDS if k in space.baselines]
    score_s, untimed = 0.0, 0
    for r in fit:
        pair = twins(ledger.rows, r, ledger.budget)
        untimed += r.speedup is None
        for kind in kinds:
            if not has_twin(scorer, r, kind):
                score_s += baseline_cost(scorer, kind)
                untimed += 1
            elif pair.get(kind) is not None and pair[kind].speedup is None:
                untimed += 1
    future = n - len(fit)
    score_s += future * sum(baseline_cost(scorer, k) for k in kinds)
    untimed += future * (1 + len(kinds))
    return score_s + bench.cost(untimed) + final_s


def sweep(scorer: Scorer, settings: Settings, bench: Bench) -> None:
    """The phases in order, each within the time the later ones keep (README, "Choosing a plan"):
    the unpatched model's pass over the photos; the recipe's plan scored and timed (what a score, an export and
    a timing cost is measured there); every candidate plan scored while the time kept for the cheapest plans'
    baselines, their timing, the held-out check and the files is left; those baselines, then the others while
    the timing of `timed` plans is left; the timing."""
    ctx, ledger, space, clock = scorer.ctx, scorer.ledger, scorer.space, scorer.clock
    assert ledger.baseline is not None
    upto = max([a for a in space.alpha if a < ctx.models.facts.depth] + [ctx.models.plan.alpha])
    with clock.measure("cache"):
        cache = scorer.cache(ctx.batch, upto)
    metrics = [k for k in scorer.score(cache, cache.outputs)
               if k not in ("images", "per_image") and not k.endswith("_undefined")]
    check_budget_metric(settings.budget, metrics)
    if not ctx.pretrained:
        ledger.structure_check_only = STRUCTURE_ONLY
        progress.info(f"note: {STRUCTURE_ONLY}")
    recipe = recipe_phase(scorer, cache)
    if recipe.speedup is None or "export" not in clock.earlier | clock.costs:
        bench.time([recipe], what="the recipe's plan and the unpatched model (what a timing costs)")
    sizes = input_sizes(scorer)
    if "downscale" in space.baselines and sizes:
        size_gflops(scorer, sizes[0])  # every downscaled baseline needs it; what counting a size costs
    final_s = clock.final_s(len(settings.holdout or []), len(ctx.photos))
    keep = must_reserve(scorer, bench, final_s)
    progress.info(f"Time: {clock.elapsed():.0f} s of the {clock.limit_s:.0f} s limit spent; {keep:.0f} s kept for "
                  f"the cheapest plans' baselines and their timing, the held-out check and the files")
    if not clock.fits(0.0, keep):
        progress.info(f"note: --time-limit {clock.limit_s / 60:g} min is shorter than this sweep's minimum: no "
                      f"plan beyond the recipe's is scored, and timing the cheapest plan and its baselines runs "
                      f"past the limit")
    fidelity_phase(scorer, cache, lambda: must_reserve(scorer, bench, final_s))
    cheapest = fits_cheapest(ledger.rows, ledger.budget, ledger.baseline.gflops)[:must_count(space.timed)]
    baseline_phase(scorer, cache, cheapest, lambda: latency_keep(scorer, bench, final_s))
    del cache
    must, more = to_time(ledger.rows, ledger.budget, ledger.baseline.gflops, space.timed)
    latency_phase(bench, must, more, final_s)


def latency_keep(scorer: Scorer, bench: Bench, final_s: float) -> float:
    """The time the baselines beyond the cheapest plans' leave: all the timing, the held-out check, the files."""
    ledger = scorer.ledger
    assert ledger.baseline is not None
    must, more = to_time(ledger.rows, ledger.budget, ledger.baseline.gflops, scorer.space.timed)
    return bench.cost(len(must) + len(more)) + final_s


def tune(recipe: Recipe, engine: EngineProfile, photos: list[Photo], settings: Settings, folder: Path) -> Ledger:
    """`hgdeploy tune`: the sweep, its inputs checked by the command line; the ledger tune.json holds. The run
    counts its time from the command's start (`settings.started`)."""
    clock = Clock(settings.limit_s, settings.started)
    with clock.measure("load"):
        ctx = load_context(recipe, engine, photos)
    space = dataclasses.replace(default_space(ctx.models.facts, recipe.request, ctx.models.plan.device),
                                **settings.space)
    ledger = start_ledger(ctx, settings.budget, space, photos, folder, clock)
    scorer = Scorer(ctx, space, ledger, clock)
    try:
        with tempfile.TemporaryDirectory(prefix="hgdeploy-tune-") as tmp:
            sweep(scorer, settings, Bench(ctx, ledger, clock, Path(tmp), scorer.model_for))
        ledger.stopped = stopped(ledger, clock)
        ledger.state = "stopped at --time-limit" if ledger.stopped else "done"
        ledger.best = select_best(ledger.rows, settings.budget)
        if ledger.best is not None and settings.holdout:
            ledger.best.holdout = holdout(scorer, ledger.best, settings.holdout)
        ledger.comparison = matched(ledger.rows, settings.budget)
        with clock.measure("files"):
            write_results(ledger, recipe.data, header(ledger, len(photos)))
    except KeyboardInterrupt:
        ledger.state, ledger.best = "interrupted", None
        remove_outputs(folder)  # tune.json alone says what was measured: no conclusion of a run not finished
        ledger.save()
        progress.info(f"interrupted: the {len(ledger.rows)} plans measured so far are in {folder}/tune.json; "
                      f"run the same command again to resume")
        raise
    return ledger


def stopped(ledger: Ledger, clock: Clock) -> str | None:
    """What --time-limit left out, in words (None when nothing was)."""
    if not ledger.skipped:
        return None
    scoring, timing = ledger.skipped_count("scoring"), ledger.skipped_count("timing")
    return (f"--time-limit {clock.limit_s / 60:g} min: {scoring} plans and baselines skipped for time before "
            f"scoring, {timing} scored ones before timing; the same command resumes them")


def header(ledger: Ledger, images: int) -> list[str]:
    """best.toml's first lines: where it comes from and what it measured."""
    budget, best = ledger.budget, ledger.best
    return [f"Tuned by hgdeploy tune from recipe {ledger.context['recipe']} for {ledger.context['engine']}, budget "
            f"{budget}, on {images} images.",
            f"Measured speed-up {speedup_text(best.speedup, best.speedup_ci, 3)}, {budget.key} "
            f"{(best.fidelity or {})[budget.key]:.4f}."
            if best and best.speedup else "No plan was within the budget and faster."]
