"""`hgdeploy tune`: the fastest plan that keeps the user's quality budget, measured on their device.

Two phases. Fidelity first, in PyTorch on the user's images (cheap): the unpatched model runs once per
image and its first blocks are replayed into every plan (`replay.PrefixCache`); within one alpha and one set
of options, grids go from the most clusters to the fewest and the first to miss the budget rules out the
rest. The parameter-free baselines are scored the same way: average pooling + bilinear upsampling at each
scored alpha and grid, and the unpatched model on the smallest input with at least each plan's GFLOPs.
Latency second, with the engine profile: the cheapest plans within the budget (and the recipe's own plan,
and the baselines matched to the cheapest) are exported, passed through the graph passes and timed in
groups interleaved with the unpatched model, so every speed-up is a ratio measured in one run.

tune.json is rewritten after every measured row: Ctrl-C keeps what was measured, and the same command with
the same output folder resumes (rows are found again by their plan values).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hgdeploy.backends import EngineProfile, make_runner
from hgdeploy.core import progress
from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, PlanRequest, parse_grid
from hgdeploy.core.recipe import Recipe
from hgdeploy.families.catalogue import get_family
from hgdeploy.layers import TokenClustering
from hgdeploy.measure.checks import fidelity
from hgdeploy.measure.flops import count_gflops_fast
from hgdeploy.measure.images import Photo, to_batch
from hgdeploy.patch.patched import patch_for
from hgdeploy.patch.tau import probe, tau_from_tokens
from hgdeploy.pipeline import engines
from hgdeploy.pipeline.context import STRUCTURE_ONLY, Context, load_context
from hgdeploy.pipeline.road import write_deployable
from hgdeploy.pipeline.steps import backend_info
from hgdeploy.tune.downscale import resize_output, smaller_sizes
from hgdeploy.tune.replay import PrefixCache, clustered_span, find_blocks
from hgdeploy.tune.report import (
    cluster_section,
    matched,
    plan_text,
    save_progress,
    select_best,
    within,
    write_results,
)
from hgdeploy.tune.space import (
    Budget,
    Space,
    candidates,
    check_budget_metric,
    default_space,
    parse_budget,
    plan_key,
    pool_request,
    read_space,
)

GROUP = 4  # plans timed per interleaved run with the unpatched model
BASELINES_MATCHED = 3  # the cheapest timed plans whose pooling and downscaled baselines are timed too
FIDELITY_SHARE = 0.5  # of --time-limit: after it the fidelity phase stops, so that plans still get timed
DEFAULT_TIME_LIMIT = 30.0


TUNE_FOLDER = "tune"  # runs/<recipe>/tune by default


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a sweep must keep and how long it may take, read from the command line before any model."""

    budget: Budget
    space: dict[str, Any]
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


def fingerprint(photos: list[Photo]) -> list[dict[str, str]]:
    return [{"name": p.name, "sha256": hashlib.sha256(p.image.tobytes()).hexdigest()[:16]} for p in photos]


def previous(folder: Path, context: dict[str, Any]) -> dict[str, Any]:
    """An earlier tune.json in `folder` (to resume; {} without one), refused when it tuned something else."""
    path = folder / "tune.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        ctx, _ = old["context"], list(old["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a tune.json this version can resume; choose another --out or remove it") \
            from None
    for part, what in (("recipe", "recipe values"), ("images", "images"), ("engine", "engine profile")):
        if ctx.get(part) != context[part] or (part == "recipe" and ctx.get("values") != context["values"]):
            raise UserError(f"{folder} holds a tune run with other {what}; rerun with the same ones to resume, or "
                            f"choose another --out")
    return old


class Sweep:
    """The state of one tune run: the model, the cached unpatched pass, the rows measured so far."""

    def __init__(self, ctx: Context, budget: Budget, space: Space, folder: Path, result: dict[str, Any],
                 done: dict[str, dict[str, Any]], limit_s: float):
        self.job, self.budget, self.space, self.folder, self.result = ctx, budget, space, folder, result
        self.done, self.start, self.limit_s = done, time.monotonic(), limit_s
        self.family, self.models = ctx.models.family, ctx.models
        self.facts = ctx.models.facts
        self.kinds = dict(self.family.outputs)
        self.names = [p.name for p in ctx.photos]
        self.device = ctx.engine.device
        self.models_for: dict[str, Callable[[], nn.Module]] = {}  # row key -> its model, for the rows to be timed
        self.sizes: dict[str, float] = dict(result.get("downscale_gflops", {}))

    # ------------------------------------------------------------------ bookkeeping

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        rows = [r for r in self.result["rows"] if r["key"] != row["key"]] + [row]
        self.result["rows"] = rows
        self.result["elapsed_s"] = self.elapsed()
        save_progress(self.folder, self.result)
        return row

    def prune(self, key: str, plan: dict[str, Any], reason: str) -> None:
        self.result["pruned"].append({"key": key, "plan": plan, "reason": reason})

    def row_line(self, row: dict[str, Any], count: str) -> None:
        value, bound = row["fidelity"].get(self.budget.key), self.budget.bound(row["fidelity"])
        ok = within(row, self.budget)
        fits = [r for r in self.result["rows"] if r["kind"] == "clustering" and within(r, self.budget)]
        best = min(fits, key=lambda r: r["gflops"]) if fits else None
        shown = "—" if value is None else f"{value:.4f}"
        shown += f" (bound {'—' if bound is None else f'{bound:.4f}'})"
        progress.info(f"  {count} {row['kind']} {plan_text(row)}: {self.budget.key} {shown} "
                      f"{'within' if ok else 'misses'} budget, "
                      f"{row['gflops']:.4g} GFLOPs"
                      + (f"   [cheapest within budget so far: {plan_text(best)}, {best['gflops']:.4g} GFLOPs]"
                         if best else ""), markup=False)

    # ------------------------------------------------------------------ fidelity phase

    def cache(self, images: torch.Tensor, upto: int) -> PrefixCache:
        blocks = find_blocks(self.models.baseline, self.models.patched, self.models.plan.alpha, self.facts.depth)
        with progress.step(f"Running the unpatched model once on {images.shape[0]} images (its first {upto} blocks "
                           f"kept for every plan)"):
            return PrefixCache(self.models.baseline, blocks, images, self.family.output_names, upto)

    def score(self, cache: PrefixCache, outputs: list[dict[str, Any]],
              names: list[str] | None = None) -> dict[str, Any]:
        return fidelity(outputs, cache.outputs, self.kinds, names or self.names)

    def patched(self, cache: PrefixCache, request: PlanRequest) -> tuple[ClusterPlan, nn.Module, str]:
        """The plan and patched model; tau "auto" calibrated on the cached tokens entering the clustering layer."""
        source = "given"
        if request.tau_auto:
            model, layer = probe(self.family, self.models.baseline, request, self.facts, self.device)
            tau, _ = tau_from_tokens(layer, cache.tokens_at(request.alpha, clustered_span(model)), "auto")
            request = request.with_tau(tau)
            source = "auto"
        plan, model = patch_for(self.family, self.models.baseline, self.facts, request, self.device)
        return plan, model, source

    def measure_plan(self, cache: PrefixCache, kind: str, key: str, request: PlanRequest,
                     recipe: bool = False) -> dict[str, Any]:
        if recipe:
            plan, model, source = self.models.plan, self.models.patched, "recipe"
        else:
            plan, model, source = self.patched(cache, request)
        self.models_for[key] = lambda: model
        old = self.done.get(key)
        if reusable(old):
            return self.add(old | {"recipe": recipe})
        forms = sorted({m.form for m in model.modules() if isinstance(m, TokenClustering)})
        values = {k: v for k, v in plan.to_dict().items() if k not in ("token_grid", "depth", "device", "num_tokens")}
        row = {"key": key, "kind": kind, "baseline": kind != "clustering", "recipe": recipe,
               "plan": values | {"tau_source": source, "clustering_form": ",".join(forms) or None},
               "gflops": count_gflops_fast(model, self.job.example).total,
               "fidelity": self.score(cache, cache.run(model, plan.alpha))}
        return self.add(row)

    def fidelity_phase(self, cache: PrefixCache) -> None:
        todo = list(candidates(self.space, self.job.recipe.request, self.facts))
        failed: set[tuple[Any, ...]] = set()
        progress.info(f"Scoring {len(todo)} plans on {len(self.names)} images (budget {self.budget}); within one "
                      f"alpha and set of options, a grid that misses the budget rules out the smaller ones")
        recipe_key = plan_key("clustering", self.job.recipe.request)
        row = self.measure_plan(cache, "clustering" if self.models.plan.method == "cluster" else "pool_bilinear",
                                recipe_key, self.job.recipe.request, recipe=True)
        self.row_line(row, "[recipe]")
        for i, cand in enumerate(todo, 1):
            if cand.key == recipe_key:
                continue
            plan = {"alpha": cand.request.alpha, "grid": f"{cand.request.grid[0]}x{cand.request.grid[1]}"}
            if cand.group in failed:
                self.prune(cand.key, plan, "a larger grid at the same alpha and options already missed the budget")
                continue
            if self.elapsed() > FIDELITY_SHARE * self.limit_s:
                self.prune(cand.key, plan, f"the fidelity phase reached {FIDELITY_SHARE:.0%} of --time-limit")
                continue
            try:
                row = self.measure_plan(cache, "clustering", cand.key, cand.request)
            except UserError as exc:
                self.prune(cand.key, plan, f"not a valid plan for this model ({exc})")
                continue
            self.row_line(row, f"[{i}/{len(todo)}]")
            if not within(row, self.budget):
                failed.add(cand.group)

    def pool_phase(self, cache: PrefixCache) -> None:
        if "pool_bilinear" not in self.space.baselines:
            return
        seen: dict[str, PlanRequest] = {}
        for row in [r for r in self.result["rows"] if r["kind"] == "clustering"]:
            p = row["plan"]
            request = pool_request(PlanRequest(p["alpha"], parse_grid(p["grid"]), p["reconstruct_after"],
                                               {"k": p["k"], "reconstruct_on": p["reconstruct_on"]}))
            seen.setdefault(plan_key("pool_bilinear", request), request)
        progress.info(f"Scoring the average-pool + bilinear baseline at {len(seen)} alpha and grid points")
        for i, (key, request) in enumerate(seen.items(), 1):
            self.row_line(self.measure_plan(cache, "pool_bilinear", key, request), f"[{i}/{len(seen)}]")

    def downscale_model(self, size: tuple[int, int]) -> tuple[nn.Module, Any]:
        rec = self.job.recipe
        model = self.family.load(rec.checkpoint, size, rec.options).eval()
        return model, dataclasses.replace(self.models.preprocess, size=size)

    def size_gflops(self, size: tuple[int, int]) -> float:
        name = f"{size[0]}x{size[1]}"
        if name not in self.sizes:
            model, pre = self.downscale_model(size)
            self.sizes[name] = count_gflops_fast(model, torch.zeros(1, 3, *pre.size)).total
            self.result["downscale_gflops"] = self.sizes
        return self.sizes[name]

    def downscale_phase(self, cache: PrefixCache) -> None:
        if "downscale" not in self.space.baselines:
            return
        targets = sorted({r["gflops"] for r in self.result["rows"] if r["kind"] == "clustering"}, reverse=True)
        if not targets:
            return
        chosen: dict[tuple[int, int], float] = {}
        with progress.step("Finding the input sizes with the GFLOPs of the scored plans"):
            sizes = list(smaller_sizes(self.job.recipe.input_size, self.facts.token_grid))
            flops = []
            for size in sizes:  # descending sizes, descending GFLOPs: stop below the cheapest plan
                flops.append(self.size_gflops(size))
                if flops[-1] < targets[-1]:
                    break
            for t in targets:
                fit = [(g, s) for g, s in zip(flops, sizes) if g >= t]
                if fit:
                    g, s = min(fit)
                    chosen[s] = g
        progress.info(f"Scoring the downscaled input at {len(chosen)} sizes")
        full = cache.outputs
        grid_full = self.facts.token_grid
        for i, (size, g) in enumerate(sorted(chosen.items(), reverse=True), 1):
            key = plan_key("downscale", input_size=size)
            self.models_for[key] = lambda size=size: self.downscale_model(size)[0]  # loaded again only if timed
            if reusable(self.done.get(key)):
                self.add(self.done[key])
                continue
            model, pre = self.downscale_model(size)
            grid = self.family.facts(model).token_grid
            batch = to_batch(list(self.job.photos), pre)
            outs = []
            with torch.no_grad():
                for j in range(batch.shape[0]):
                    raw = dict(zip(self.family.output_names, (o.numpy() for o in model(batch[j:j + 1]))))
                    outs.append({n: resize_output(raw[n], self.kinds[n], full[j][n], grid, grid_full) for n in raw})
            row = self.add({"key": key, "kind": "downscale", "baseline": True, "recipe": False,
                            "plan": {"input_size": f"{size[0]}x{size[1]}", "token_grid": f"{grid[0]}x{grid[1]}"},
                            "gflops": g, "fidelity": self.score(cache, outs)})
            self.row_line(row, f"[{i}/{len(chosen)}]")

    # ------------------------------------------------------------------ latency phase

    def to_time(self) -> list[dict[str, Any]]:
        """The rows to time, in order: the cheapest clustering plans within the budget, the recipe's plan, and
        the baselines matched to the cheapest few."""
        rows = self.result["rows"]
        base = self.result["baseline"]["gflops"]
        fit = sorted((r for r in rows if r["kind"] == "clustering" and within(r, self.budget)
                      and r["gflops"] < base), key=lambda r: r["gflops"])[: self.space.timed]
        chosen = list(fit)
        recipe = next((r for r in rows if r.get("recipe")), None)
        if recipe is not None and recipe not in chosen:
            chosen.append(recipe)
        by_key = {c["key"]: c for c in matched(rows, self.budget)}
        for r in fit[:BASELINES_MATCHED]:
            for name in ("pool_bilinear", "downscale"):
                other = (by_key.get(r["key"]) or {}).get(name)
                twin = next((x for x in rows if other and x["key"] == other["key"]), None)
                if twin is not None and twin not in chosen:
                    chosen.append(twin)
        return [r for r in chosen if r.get("speedup") is None and r["key"] in self.models_for]

    def export_graph(self, row: dict[str, Any], model: nn.Module, folder: Path) -> Path:
        """What the profile's engine runs for one row, from the export road: a downscaled input as a baseline
        graph; a plan as a patched graph with the graph passes; both in the profile's precision."""
        engine = self.job.engine
        if row["kind"] == "downscale":
            example = torch.zeros(1, 3, *parse_grid(row["plan"]["input_size"]))
            export, _ = write_deployable(dataclasses.replace(self.models, baseline=model), example, engine, folder,
                                         roles=("baseline",))
            return export.baseline_graph(engine)
        export, _ = write_deployable(dataclasses.replace(self.models, patched=model), self.job.example, engine, folder,
                                     {"plan": row["plan"]}, roles=("patched",))
        return export.patched_graph(engine)

    def latency_phase(self) -> None:
        queue = self.to_time()
        if not queue:
            return
        profile = self.job.engine
        progress.info(f"Timing {len(queue)} plans on {profile.name}, {GROUP} at a time interleaved with the "
                      f"unpatched model")
        group_s: list[float] = []
        with tempfile.TemporaryDirectory(prefix="hgdeploy-tune-") as tmp:
            with progress.step("Exporting the unpatched model"), progress.muted():
                base, _ = write_deployable(self.models, self.job.example, profile, Path(tmp) / "baseline",
                                           roles=("baseline",))
                base_graph = base.baseline_graph(profile)
            for start in range(0, len(queue), GROUP):
                group = queue[start:start + GROUP]
                estimate = max(group_s) if group_s else 0.0
                if self.elapsed() + estimate > self.limit_s:
                    self.result["stopped"] = (f"--time-limit reached: {len(queue) - start} of {len(queue)} plans "
                                              f"were not timed")
                    progress.info(f"note: {self.result['stopped']}")
                    return
                began = time.monotonic()
                graphs: dict[str, Path] = {}
                with progress.step(f"Exporting {len(group)} plans (ONNX, graph passes)"), progress.muted():
                    for j, row in enumerate(group):
                        graphs[row["key"]] = self.export_graph(row, self.models_for[row["key"]](),
                                                               Path(tmp) / f"g{start + j}")
                runners = {"baseline": make_runner(base_graph, profile)}
                runners |= {r["key"]: make_runner(graphs[r["key"]], profile) for r in group}
                feeds = {k: engines.zeros_feed(p) for k, p in graphs.items()}
                timings = engines.time_runners(runners, engines.zeros_feed(base_graph), profile, feeds,
                                                  what=f"plans {start + 1}-{start + len(group)} of {len(queue)} "
                                                       f"and the unpatched model")
                self.result["baseline"]["latency_ms"] = timings["baseline"].median_ms
                for row in group:
                    t = timings[row["key"]]
                    row.update(latency_ms=t.median_ms, latency=t.to_dict(),
                               baseline_latency_ms=timings["baseline"].median_ms,
                               speedup=timings["baseline"].median_ms / t.median_ms)
                    self.add(row)
                    progress.info(f"  {row['kind']} {plan_text(row)}: {row['speedup']:.3f}x "
                                  f"({t.median_ms:.1f} ms vs {timings['baseline'].median_ms:.1f} ms)")
                best = select_best(self.result["rows"], self.budget)
                progress.info(f"  best so far: {plan_text(best)}, {best['speedup']:.3f}x" if best
                              else "  best so far: none faster than the unpatched model within the budget")
                group_s.append(time.monotonic() - began)

    # ------------------------------------------------------------------ held-out images

    def holdout(self, best: dict[str, Any], photos: list[Photo]) -> dict[str, Any]:
        images = to_batch(photos, self.models.preprocess)
        cache = self.cache(images, best["plan"]["alpha"])
        request = PlanRequest.from_section(cluster_section(best))
        plan, model = patch_for(self.family, self.models.baseline, self.facts, request, self.device)
        fid = self.score(cache, cache.run(model, plan.alpha), [ph.name for ph in photos])
        mean = dataclasses.replace(self.budget, confidence=0.5)  # a check of the estimate: its plain mean
        return {"images": len(photos), "names": [ph.name for ph in photos], "fidelity": fid,
                "within_budget": mean.met(fid)}


def reusable(row: dict[str, Any] | None) -> bool:
    """A row of an earlier run that can stand: scored, with the per-image values a budget's bound needs."""
    return row is not None and bool((row.get("fidelity") or {}).get("per_image"))


def tune(recipe: Recipe, engine: EngineProfile, photos: list[Photo], settings: Settings, folder: Path) -> dict[str, Any]:
    """`hgdeploy tune`: the sweep, its inputs checked by the command line; tune.json's content."""
    budget, limit_s, held = settings.budget, settings.limit_s, settings.holdout
    job = load_context(recipe, engine, photos)
    info = job.describe().to_json()
    context = {"recipe": recipe.name, "values": info["recipe"]["values"], "images": fingerprint(photos),
               "engine": engine.name}
    old = previous(folder, context)
    done = {r["key"]: r for r in old.get("rows", [])}
    facts = job.models.facts
    space = dataclasses.replace(default_space(facts, recipe.request, job.models.plan.device), **settings.space)
    result: dict[str, Any] = {"tool": "hgdeploy tune", "state": "running", "context": context, "budget": str(budget),
                              "confidence": budget.confidence,
                              "space": space.to_dict(), "backend": backend_info(job), "rows": [],
                              "pruned": [], "best": None, "resumed_rows": len(done)}
    result["downscale_gflops"] = old.get("downscale_gflops", {})
    sweep = Sweep(job, budget, space, folder, result, done, limit_s)
    try:
        upto = max([a for a in space.alpha if a < facts.depth] + [job.models.plan.alpha])
        cache = sweep.cache(job.batch, upto)
        metrics = [k for k in sweep.score(cache, cache.outputs)
                   if k not in ("images", "per_image") and not k.endswith("_undefined")]
        check_budget_metric(budget, metrics)
        if not job.pretrained:
            result["structure_check_only"] = STRUCTURE_ONLY
            progress.info(f"note: {STRUCTURE_ONLY}")
        result["baseline"] = {"gflops": count_gflops_fast(job.models.baseline, job.example).total,
                              "latency_ms": (old.get("baseline") or {}).get("latency_ms")}
        if done:
            progress.info(f"Resuming: {len(done)} plans of the earlier run in {folder}/tune.json are reused")
        sweep.fidelity_phase(cache)
        sweep.pool_phase(cache)
        sweep.downscale_phase(cache)
        del cache
        sweep.latency_phase()
    except KeyboardInterrupt:
        result["state"] = "interrupted"
        result["elapsed_s"] = sweep.elapsed()
        save_progress(folder, result)
        progress.info(f"interrupted: the {len(result['rows'])} plans measured so far are in {folder}/tune.json; "
                      f"run the same command again to resume")
        raise
    result["state"] = "stopped at --time-limit" if result.get("stopped") else "done"
    best = select_best(result["rows"], budget)
    if best is not None and held:
        best["holdout"] = sweep.holdout(best, held)
    result["best"] = best
    result["comparison"] = matched(result["rows"], budget)
    result["elapsed_s"] = sweep.elapsed()
    header = [f"Tuned by hgdeploy tune from recipe {recipe.name} for {engine.name}, budget {budget}, on "
              f"{len(photos)} images.",
              f"Measured speed-up {best['speedup']:.3f}x, {budget.key} {best['fidelity'][budget.key]:.4f}."
              if best else "No plan was within the budget and faster."]
    write_results(folder, result, budget, info["recipe"]["values"], header)
    return result
