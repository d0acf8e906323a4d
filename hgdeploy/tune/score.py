"""The scoring phases of `hgdeploy tune`, in PyTorch on the user's images (cheap, before any plan is timed).

The unpatched model runs once per image and its first blocks are replayed into every plan
(`replay.PrefixCache`); within one alpha and one set of options, grids go from the most clusters to the
fewest and the first to miss the budget rules out the rest. The parameter-free baselines are scored the same
way: average pooling + bilinear upsampling at each scored alpha and grid, and the unpatched model on the
smallest input with at least each plan's GFLOPs. tau = "auto" is calibrated by `patch.tau` (the one
calibration), on the cached tokens entering the clustering layer.

Nothing is measured twice: a phase asks the ledger for a row's key before it builds any model (a resumed run's
rows are there from the start), and no model is kept: `Scorer.model_for` builds a row's model again from its
plan when it is timed. Every step is timed on the run's `Clock`; a step that does not fit before --time-limit,
with the time kept for the later phases, is skipped for time (listed apart from the pruned plans).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch
from torch import nn

from hgdeploy.core import progress
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject
from hgdeploy.core.plan import ClusterPlan, PlanRequest, parse_grid
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.layers import TokenClustering
from hgdeploy.measure.checks import fidelity
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.measure.images import Photo, to_batch
from hgdeploy.patch.patched import patch_for
from hgdeploy.patch.tau import probe, tau_from_tokens
from hgdeploy.pipeline.context import Context
from hgdeploy.tune.clock import Clock
from hgdeploy.tune.downscale import resize_output, smaller_sizes
from hgdeploy.tune.ledger import Ledger, Row
from hgdeploy.tune.replay import PrefixCache, clustered_span, find_blocks
from hgdeploy.tune.report import cluster_section, plan_text
from hgdeploy.tune.select import cheapest_within, within
from hgdeploy.tune.space import Space, candidates, plan_key, pool_request

# Plan values a row keeps (the others are the model's facts, the same for every row).
FACT_KEYS = ("token_grid", "depth", "device", "num_tokens")
BASELINE_KINDS = ("pool_bilinear", "downscale")


@dataclasses.dataclass
class Scorer:
    """What the phases share: the context, the ledger they fill (holding the earlier run's rows), the clock."""

    ctx: Context
    space: Space
    ledger: Ledger
    clock: Clock

    def cache(self, images: torch.Tensor, upto: int) -> PrefixCache:
        models = self.ctx.models
        blocks = find_blocks(models.baseline, models.patched, models.plan.alpha, models.facts.depth)
        with progress.step(f"Running the unpatched model once on {images.shape[0]} images (its first {upto} blocks "
                           f"kept for every plan)"):
            return PrefixCache(models.baseline, blocks, images, models.family.output_names, upto)

    def score(self, cache: PrefixCache, outputs: list[JsonObject], names: list[str] | None = None) -> JsonObject:
        models = self.ctx.models
        return fidelity(outputs, cache.outputs, dict(models.family.outputs), names or [p.name for p in self.ctx.photos])

    def patched(self, cache: PrefixCache, request: PlanRequest) -> tuple[ClusterPlan, nn.Module, str]:
        """The plan and patched model; tau "auto" calibrated on the cached tokens entering the clustering layer."""
        m, source = self.ctx.models, "given"
        if request.tau_auto:
            model, layer = probe(m.family, m.baseline, request, m.facts, self.ctx.engine.device)
            tau, _ = tau_from_tokens(layer, cache.tokens_at(request.alpha, clustered_span(model)), "auto")
            request, source = request.with_tau(tau), "auto"
        plan, model = patch_for(m.family, m.baseline, m.facts, request, self.ctx.engine.device)
        return plan, model, source

    def model_for(self, row: Row) -> nn.Module:
        """A measured row's model, built again from its plan (tau as calibrated, the form as resolved): what the
        latency phase exports. The recipe's row is the loaded patched model."""
        m = self.ctx.models
        if row.recipe:
            return m.patched
        if row.kind == "downscale":
            return downscale_model(self, parse_grid(row.plan["input_size"]))[0]
        request = PlanRequest.from_section(cluster_section(row.plan))
        return patch_for(m.family, m.baseline, m.facts, request, self.ctx.engine.device)[1]

    def measure_plan(self, cache: PrefixCache, kind: str, key: str, request: PlanRequest,
                     recipe: bool = False) -> Row:
        """The plan's row: the ledger's when it has one (nothing is built), else the plan patched and scored."""
        old = self.ledger.row(key)
        if old is not None:
            return old
        with self.clock.measure("score"):
            if recipe:
                plan, model, source = self.ctx.models.plan, self.ctx.models.patched, "recipe"
            else:
                plan, model, source = self.patched(cache, request)
            forms = sorted({m.form for m in model.modules() if isinstance(m, TokenClustering)})
            values = {k: v for k, v in plan.to_dict().items() if k not in FACT_KEYS}
            row = Row(key=key, kind=kind, baseline=kind != "clustering", recipe=recipe,
                      plan=values | {"tau_source": source, "clustering_form": ",".join(forms) or None},
                      gflops=count_gflops_fast(model, self.ctx.example).total,
                      fidelity=self.score(cache, cache.run(model, plan.alpha)))
        return self.ledger.add(row)

    def row_line(self, row: Row, count: str) -> None:
        budget = self.ledger.budget
        value, bound = (row.fidelity or {}).get(budget.key), budget.bound(row.fidelity or {})
        best = cheapest_within(self.ledger.rows, budget)
        shown = ("—" if value is None else f"{value:.4f}") + f" (bound {'—' if bound is None else f'{bound:.4f}'})"
        progress.info(f"  {count} {row.kind} {plan_text(row)}: {budget.key} {shown} "
                      f"{'within' if within(row, budget) else 'misses'} budget, {row.gflops:.4g} GFLOPs"
                      + (f"   [cheapest within budget so far: {plan_text(best)}, {best.gflops:.4g} GFLOPs]"
                         if best else ""), markup=False)


def recipe_key(s: Scorer) -> str:
    return plan_key("clustering", s.ctx.recipe.request)


def recipe_phase(s: Scorer, cache: PrefixCache) -> Row:
    """The recipe's own plan, scored first (its cost is the first estimate of a plan's)."""
    kind = "clustering" if s.ctx.models.plan.method == "cluster" else "pool_bilinear"
    had = s.ledger.row(recipe_key(s)) is not None
    row = s.measure_plan(cache, kind, recipe_key(s), s.ctx.recipe.request, recipe=True)
    s.row_line(row, "[recipe, from the earlier run]" if had else "[recipe]")
    return row


def fidelity_phase(s: Scorer, cache: PrefixCache, keep: Callable[[], float]) -> None:
    """Every candidate after the recipe's plan; a grid that misses the budget rules out the smaller ones. A plan
    is scored only when its cost and `keep()` (the time the later phases need) fit before --time-limit."""
    recipe, budget = s.ctx.recipe, s.ledger.budget
    todo = list(candidates(s.space, recipe.request, s.ctx.models.facts))
    failed: set[tuple[object, ...]] = set()
    progress.info(f"Scoring {len(todo)} plans on {len(s.ctx.photos)} images (budget {budget}); within one "
                  f"alpha and set of options, a grid that misses the budget rules out the smaller ones")
    reused = skipped = 0
    for i, cand in enumerate(todo, 1):
        if cand.key == recipe_key(s):
            continue
        plan = {"alpha": cand.request.alpha, "grid": f"{cand.request.grid[0]}x{cand.request.grid[1]}"}
        if cand.group in failed:
            s.ledger.prune(cand.key, plan, "a larger grid at the same alpha and options already missed the budget")
            continue
        row = s.ledger.row(cand.key)
        if row is not None:
            reused += 1
        elif not s.clock.fits(s.clock.cost("score"), keep()):
            s.ledger.skip("clustering", cand.key, plan, "scoring")
            skipped += 1
            continue
        else:
            try:
                row = s.measure_plan(cache, "clustering", cand.key, cand.request)
            except UserError as exc:
                s.ledger.prune(cand.key, plan, f"not a valid plan for this model ({exc})")
                continue
            s.row_line(row, f"[{i}/{len(todo)}]")
        if not within(row, budget):
            failed.add(cand.group)
    if reused:
        progress.info(f"  {reused} plans scored by the earlier run were reused, not scored again")
    if skipped:
        progress.info(f"note: {skipped} plans skipped for time: scoring them would not leave the "
                      f"{keep():.0f} s the cheapest plans' baselines, their timing and the files need")


# ------------------------------------------------------------------------------------------------ baselines


def pool_twin(s: Scorer, cache: PrefixCache, row: Row) -> Row:
    """Average pooling + bilinear upsampling at a clustering row's alpha, grid and rebuild layer."""
    p = row.plan
    request = pool_request(PlanRequest(p["alpha"], parse_grid(p["grid"]), p["reconstruct_after"],
                                       {"k": p["k"], "reconstruct_on": p["reconstruct_on"]}))
    key = plan_key("pool_bilinear", request)
    had = s.ledger.row(key)
    twin = s.measure_plan(cache, "pool_bilinear", key, request)
    if had is None:
        s.row_line(twin, "[baseline]")
    return twin


def downscale_model(s: Scorer, size: tuple[int, int]) -> tuple[nn.Module, Preprocess]:
    rec, models = s.ctx.recipe, s.ctx.models
    model = models.family.load(rec.checkpoint, size, rec.options).eval()
    return model, dataclasses.replace(models.preprocess, size=size)


def size_gflops(s: Scorer, size: tuple[int, int]) -> float:
    """The unpatched model's GFLOPs at an input size (kept in the ledger: a resumed run does not count again)."""
    name = f"{size[0]}x{size[1]}"
    if name not in s.ledger.downscale_gflops:
        with s.clock.measure("count"):
            model, pre = downscale_model(s, size)
            s.ledger.downscale_gflops[name] = count_gflops_fast(model, torch.zeros(1, 3, *pre.size)).total
    return s.ledger.downscale_gflops[name]


def input_sizes(s: Scorer) -> list[tuple[int, int]]:
    """The downscaled inputs a plan is matched to, largest first."""
    return list(smaller_sizes(s.ctx.recipe.input_size, s.ctx.models.facts.token_grid))


def down_size(s: Scorer, gflops: float, count: bool = True) -> tuple[tuple[int, int], float] | None:
    """The smallest input size with at least `gflops` GFLOPs and its GFLOPs (None when even the largest smaller
    size has fewer). Sizes descend and so do their GFLOPs: a bisection counts a few of them, each once (what a
    bisection that counted any cost is recorded). Without `count`, only sizes counted before are read
    (LookupError when another is needed)."""
    sizes = input_sizes(s)
    began, counted = time.monotonic(), []

    def at(size: tuple[int, int]) -> float:
        known = f"{size[0]}x{size[1]}" in s.ledger.downscale_gflops
        if not known and not count:
            raise LookupError(size)
        if not known:
            counted.append(size)
        return size_gflops(s, size)

    found = None
    if sizes and at(sizes[0]) >= gflops:
        lo, hi = 0, len(sizes) - 1  # at(sizes[lo]) >= gflops throughout
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if at(sizes[mid]) >= gflops:
                lo = mid
            else:
                hi = mid - 1
        found = sizes[lo], at(sizes[lo])
    if counted:
        s.clock.record("size", time.monotonic() - began)
    return found


def downscale_outputs(s: Scorer, cache: PrefixCache, size: tuple[int, int]) -> tuple[list[JsonObject], str]:
    """The unpatched model's outputs at a smaller input, brought back to the full-size shapes; its token grid."""
    model, pre = downscale_model(s, size)
    family, kinds = s.ctx.models.family, dict(s.ctx.models.family.outputs)
    grid, grid_full = family.facts(model).token_grid, s.ctx.models.facts.token_grid
    batch = to_batch(list(s.ctx.photos), pre)
    outs = []
    with torch.no_grad():
        for j in range(batch.shape[0]):
            raw = dict(zip(family.output_names, (o.numpy() for o in model(batch[j:j + 1]))))
            outs.append({n: resize_output(raw[n], kinds[n], cache.outputs[j][n], grid, grid_full) for n in raw})
    return outs, f"{grid[0]}x{grid[1]}"


def down_twin(s: Scorer, cache: PrefixCache, row: Row) -> Row | None:
    """The unpatched model on the smallest input with at least a clustering row's GFLOPs (None: no such size)."""
    found = down_size(s, row.gflops)
    if found is None:
        return None
    size, g = found
    key = plan_key("downscale", input_size=size)
    old = s.ledger.row(key)
    if old is not None:
        return old
    with s.clock.measure("down"):
        outs, grid = downscale_outputs(s, cache, size)
        twin = Row(key=key, kind="downscale", baseline=True, recipe=False,
                   plan={"input_size": f"{size[0]}x{size[1]}", "token_grid": grid}, gflops=g,
                   fidelity=s.score(cache, outs))
    s.ledger.add(twin)
    s.row_line(twin, "[baseline]")
    return twin


def baseline_cost(s: Scorer, kind: str) -> float:
    """What scoring one baseline of `kind` is estimated to cost: a pooling plan as a plan; a downscaled input as
    its size's bisection (a GFLOPs count per step) and its run (a load and a pass over the photos), each as
    measured once it has been."""
    clock = s.clock
    if kind == "pool_bilinear":
        return clock.cost("score")
    steps = math.ceil(math.log2(max(len(input_sizes(s)), 1))) + 1
    count = clock.cost("count", clock.cost("load"))
    return clock.cost("size", steps * count) + clock.cost("down", count + clock.cost("cache"))


def baseline_phase(s: Scorer, cache: PrefixCache, must: list[Row], keep: Callable[[], float]) -> None:
    """The baselines of `must` first (the cheapest plans within the budget: their time was kept), then those of
    every other scored plan, cheapest first, each when its cost and `keep()` fit before --time-limit."""
    kinds = [k for k in BASELINE_KINDS if k in s.space.baselines]
    if not kinds:
        return
    others = sorted((r for r in s.ledger.rows if r.kind == "clustering" and r.fidelity
                     and all(r.key != m.key for m in must)), key=lambda r: r.gflops)
    progress.info(f"Scoring the baselines at equal cost ({', '.join(kinds)}): those of the {len(must)} cheapest "
                  f"plans within the budget, then of the other {len(others)} plans while time is left")
    skipped = 0
    reserved = {r.key for r in must}
    for row in [*must, *others]:
        for kind in kinds:
            if row.key not in reserved and not has_twin(s, row, kind) and not s.clock.fits(baseline_cost(s, kind),
                                                                                            keep()):
                s.ledger.skip(kind, None, {"matching": row.key, "gflops": row.gflops}, "scoring")
                skipped += 1
                continue
            (pool_twin if kind == "pool_bilinear" else down_twin)(s, cache, row)
    if skipped:
        progress.info(f"note: {skipped} baselines skipped for time (the comparison at equal cost lists the rest)")


def has_twin(s: Scorer, row: Row, kind: str) -> bool:
    """Whether the row's matched baseline costs nothing: the ledger holds it (or no input size matches), known
    without building or counting anything."""
    if kind == "pool_bilinear":
        p = row.plan
        request = pool_request(PlanRequest(p["alpha"], parse_grid(p["grid"]), p["reconstruct_after"],
                                           {"k": p["k"], "reconstruct_on": p["reconstruct_on"]}))
        return s.ledger.row(plan_key("pool_bilinear", request)) is not None
    try:
        found = down_size(s, row.gflops, count=False)
    except LookupError:
        return False
    return found is None or s.ledger.row(plan_key("downscale", input_size=found[0])) is not None


def holdout(s: Scorer, best: Row, photos: list[Photo]) -> JsonObject:
    """The best plan scored on images it was not tuned on, against the budget's plain mean."""
    m = s.ctx.models
    with s.clock.measure("holdout"):
        cache = s.cache(to_batch(photos, m.preprocess), best.plan["alpha"])
        request = PlanRequest.from_section(cluster_section(best.plan))
        plan, model = patch_for(m.family, m.baseline, m.facts, request, s.ctx.engine.device)
        fid = s.score(cache, cache.run(model, plan.alpha), [ph.name for ph in photos])
    mean = dataclasses.replace(s.ledger.budget, confidence=0.5)  # a check of the estimate: its plain mean
    return {"images": len(photos), "names": [ph.name for ph in photos], "fidelity": fid,
            "within_budget": mean.met(fid)}
