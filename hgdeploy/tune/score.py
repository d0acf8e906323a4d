"""The scoring phases of `hgdeploy tune`, in PyTorch on the user's images (cheap, before any plan is timed).

The unpatched model runs once per image and its first blocks are replayed into every plan
(`replay.PrefixCache`); within one alpha and one set of options, grids go from the most clusters to the
fewest and the first to miss the budget rules out the rest. The parameter-free baselines are scored the same
way: average pooling + bilinear upsampling at each scored alpha and grid, and the unpatched model on the
smallest input with at least each plan's GFLOPs. tau = "auto" is calibrated by `patch.tau` (the one
calibration), on the cached tokens entering the clustering layer.
"""

from __future__ import annotations

import dataclasses
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
from hgdeploy.tune.downscale import resize_output, smaller_sizes
from hgdeploy.tune.ledger import Ledger, Row
from hgdeploy.tune.replay import PrefixCache, clustered_span, find_blocks
from hgdeploy.tune.report import cluster_section, plan_text
from hgdeploy.tune.select import cheapest_within, within
from hgdeploy.tune.space import Space, candidates, plan_key, pool_request

FIDELITY_SHARE = 0.5  # of --time-limit: after it the fidelity phase stops, so that plans still get timed
# Plan values a row keeps (the others are the model's facts, the same for every row).
FACT_KEYS = ("token_grid", "depth", "device", "num_tokens")


@dataclasses.dataclass
class Scorer:
    """What the phases share: the context, the ledger they fill, the earlier run's rows to reuse, and for every
    row that may be timed, how to get its model back."""

    ctx: Context
    space: Space
    ledger: Ledger
    done: dict[str, Row]
    limit_s: float
    models_for: dict[str, Callable[[], nn.Module]] = dataclasses.field(default_factory=dict)

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

    def measure_plan(self, cache: PrefixCache, kind: str, key: str, request: PlanRequest,
                     recipe: bool = False) -> Row:
        if recipe:
            plan, model, source = self.ctx.models.plan, self.ctx.models.patched, "recipe"
        else:
            plan, model, source = self.patched(cache, request)
        self.models_for[key] = lambda: model
        old = self.done.get(key)
        if old is not None and old.reusable():
            return self.ledger.add(dataclasses.replace(old, recipe=recipe))
        forms = sorted({m.form for m in model.modules() if isinstance(m, TokenClustering)})
        values = {k: v for k, v in plan.to_dict().items() if k not in FACT_KEYS}
        return self.ledger.add(Row(
            key=key, kind=kind, baseline=kind != "clustering", recipe=recipe,
            plan=values | {"tau_source": source, "clustering_form": ",".join(forms) or None},
            gflops=count_gflops_fast(model, self.ctx.example).total,
            fidelity=self.score(cache, cache.run(model, plan.alpha))))

    def row_line(self, row: Row, count: str) -> None:
        budget = self.ledger.budget
        value, bound = (row.fidelity or {}).get(budget.key), budget.bound(row.fidelity or {})
        best = cheapest_within(self.ledger.rows, budget)
        shown = ("—" if value is None else f"{value:.4f}") + f" (bound {'—' if bound is None else f'{bound:.4f}'})"
        progress.info(f"  {count} {row.kind} {plan_text(row)}: {budget.key} {shown} "
                      f"{'within' if within(row, budget) else 'misses'} budget, {row.gflops:.4g} GFLOPs"
                      + (f"   [cheapest within budget so far: {plan_text(best)}, {best.gflops:.4g} GFLOPs]"
                         if best else ""), markup=False)


def fidelity_phase(s: Scorer, cache: PrefixCache) -> None:
    """The recipe's plan, then every candidate; a grid that misses the budget rules out the smaller ones."""
    recipe, budget = s.ctx.recipe, s.ledger.budget
    todo = list(candidates(s.space, recipe.request, s.ctx.models.facts))
    failed: set[tuple[object, ...]] = set()
    progress.info(f"Scoring {len(todo)} plans on {len(s.ctx.photos)} images (budget {budget}); within one "
                  f"alpha and set of options, a grid that misses the budget rules out the smaller ones")
    recipe_key = plan_key("clustering", recipe.request)
    kind = "clustering" if s.ctx.models.plan.method == "cluster" else "pool_bilinear"
    s.row_line(s.measure_plan(cache, kind, recipe_key, recipe.request, recipe=True), "[recipe]")
    for i, cand in enumerate(todo, 1):
        if cand.key == recipe_key:
            continue
        plan = {"alpha": cand.request.alpha, "grid": f"{cand.request.grid[0]}x{cand.request.grid[1]}"}
        if cand.group in failed:
            s.ledger.prune(cand.key, plan, "a larger grid at the same alpha and options already missed the budget")
            continue
        if s.ledger.elapsed() > FIDELITY_SHARE * s.limit_s:
            s.ledger.prune(cand.key, plan, f"the fidelity phase reached {FIDELITY_SHARE:.0%} of --time-limit")
            continue
        try:
            row = s.measure_plan(cache, "clustering", cand.key, cand.request)
        except UserError as exc:
            s.ledger.prune(cand.key, plan, f"not a valid plan for this model ({exc})")
            continue
        s.row_line(row, f"[{i}/{len(todo)}]")
        if not within(row, budget):
            failed.add(cand.group)


def pool_phase(s: Scorer, cache: PrefixCache) -> None:
    """Average pooling + bilinear upsampling at every scored clustering plan's alpha, grid and rebuild layer."""
    if "pool_bilinear" not in s.space.baselines:
        return
    seen: dict[str, PlanRequest] = {}
    for row in [r for r in s.ledger.rows if r.kind == "clustering"]:
        p = row.plan
        request = pool_request(PlanRequest(p["alpha"], parse_grid(p["grid"]), p["reconstruct_after"],
                                           {"k": p["k"], "reconstruct_on": p["reconstruct_on"]}))
        seen.setdefault(plan_key("pool_bilinear", request), request)
    progress.info(f"Scoring the average-pool + bilinear baseline at {len(seen)} alpha and grid points")
    for i, (key, request) in enumerate(seen.items(), 1):
        s.row_line(s.measure_plan(cache, "pool_bilinear", key, request), f"[{i}/{len(seen)}]")


def downscale_model(s: Scorer, size: tuple[int, int]) -> tuple[nn.Module, Preprocess]:
    rec, models = s.ctx.recipe, s.ctx.models
    model = models.family.load(rec.checkpoint, size, rec.options).eval()
    return model, dataclasses.replace(models.preprocess, size=size)


def size_gflops(s: Scorer, size: tuple[int, int]) -> float:
    """The unpatched model's GFLOPs at an input size (kept in the ledger: a resumed run does not count again)."""
    name = f"{size[0]}x{size[1]}"
    if name not in s.ledger.downscale_gflops:
        model, pre = downscale_model(s, size)
        s.ledger.downscale_gflops[name] = count_gflops_fast(model, torch.zeros(1, 3, *pre.size)).total
    return s.ledger.downscale_gflops[name]


def downscale_sizes(s: Scorer) -> dict[tuple[int, int], float]:
    """For every scored plan's GFLOPs, the smallest input size with at least as many: size -> its GFLOPs."""
    targets = sorted({r.gflops for r in s.ledger.rows if r.kind == "clustering"}, reverse=True)
    if not targets:
        return {}
    chosen: dict[tuple[int, int], float] = {}
    with progress.step("Finding the input sizes with the GFLOPs of the scored plans"):
        sizes = list(smaller_sizes(s.ctx.recipe.input_size, s.ctx.models.facts.token_grid))
        flops: list[float] = []
        for size in sizes:  # descending sizes, descending GFLOPs: stop below the cheapest plan
            flops.append(size_gflops(s, size))
            if flops[-1] < targets[-1]:
                break
        for t in targets:
            fit = [(g, size) for g, size in zip(flops, sizes) if g >= t]
            if fit:
                g, size = min(fit)
                chosen[size] = g
    return chosen


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


def downscale_phase(s: Scorer, cache: PrefixCache) -> None:
    """The unpatched model on the smallest input with at least each scored plan's GFLOPs."""
    if "downscale" not in s.space.baselines:
        return
    chosen = downscale_sizes(s)
    progress.info(f"Scoring the downscaled input at {len(chosen)} sizes")
    for i, (size, g) in enumerate(sorted(chosen.items(), reverse=True), 1):
        key = plan_key("downscale", input_size=size)
        s.models_for[key] = lambda size=size: downscale_model(s, size)[0]  # loaded again only if timed
        old = s.done.get(key)
        if old is not None and old.reusable():
            s.ledger.add(old)
            continue
        outs, grid = downscale_outputs(s, cache, size)
        row = s.ledger.add(Row(key=key, kind="downscale", baseline=True, recipe=False,
                               plan={"input_size": f"{size[0]}x{size[1]}", "token_grid": grid}, gflops=g,
                               fidelity=s.score(cache, outs)))
        s.row_line(row, f"[{i}/{len(chosen)}]")


def holdout(s: Scorer, best: Row, photos: list[Photo]) -> JsonObject:
    """The best plan scored on images it was not tuned on, against the budget's plain mean."""
    m = s.ctx.models
    cache = s.cache(to_batch(photos, m.preprocess), best.plan["alpha"])
    request = PlanRequest.from_section(cluster_section(best.plan))
    plan, model = patch_for(m.family, m.baseline, m.facts, request, s.ctx.engine.device)
    fid = s.score(cache, cache.run(model, plan.alpha), [ph.name for ph in photos])
    mean = dataclasses.replace(s.ledger.budget, confidence=0.5)  # a check of the estimate: its plain mean
    return {"images": len(photos), "names": [ph.name for ph in photos], "fidelity": fid,
            "within_budget": mean.met(fid)}
