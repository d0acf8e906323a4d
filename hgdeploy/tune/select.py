"""The rules `hgdeploy tune` decides by, on the ledger's rows: which rows keep the budget, which to time, the
best plan, and the baselines matched to each plan at no less cost.

The best row is the fastest clustering plan within the budget that is faster than the unpatched model; there
may be none. Pure functions of rows, no model.
"""

from __future__ import annotations

from hgdeploy.core.files import JsonObject
from hgdeploy.tune.ledger import Row
from hgdeploy.tune.space import Budget

BASELINES_MATCHED = 3  # the cheapest timed plans whose pooling and downscaled baselines are timed too


def within(row: Row, budget: Budget) -> bool:
    return row.fidelity is not None and budget.met(row.fidelity)


def cheapest_within(rows: list[Row], budget: Budget) -> Row | None:
    fits = [r for r in rows if r.kind == "clustering" and within(r, budget)]
    return min(fits, key=lambda r: r.gflops) if fits else None


def select_best(rows: list[Row], budget: Budget) -> Row | None:
    """The timed clustering row with the highest speed-up, within the budget and faster than the baseline."""
    fit = [r for r in rows if r.kind == "clustering" and within(r, budget) and (r.speedup or 0) > 1.0]
    return max(fit, key=lambda r: r.speedup or 0) if fit else None


def faster_baselines(rows: list[Row], budget: Budget, best: Row | None) -> list[Row]:
    """Baseline rows within the budget that beat the best plan's measured speed-up (or any, without one)."""
    bar = (best.speedup or 1.0) if best else 1.0
    return [r for r in rows if r.kind != "clustering" and within(r, budget) and (r.speedup or 0) > bar]


def _at(row: Row) -> tuple[int, str, int]:
    return row.plan["alpha"], row.plan["grid"], row.plan["reconstruct_after"]


def _side(row: Row, other: Row | None, budget: Budget) -> JsonObject | None:
    if other is None:
        return None
    value = (row.fidelity or {}).get(budget.key)
    theirs = (other.fidelity or {}).get(budget.key)
    better = None if theirs is None or value is None else \
        (value >= theirs if budget.op == ">=" else value <= theirs) and value != theirs
    return {"key": other.key, "gflops": other.gflops, budget.key: theirs, "clustering_better": better}


def matched(rows: list[Row], budget: Budget) -> list[JsonObject]:
    """For every scored clustering row: the pooling row at its alpha, grid and reconstruction layer, and the
    smallest downscaled input with at least its GFLOPs (the baseline never gets less compute), side by side."""
    pools = {_at(r): r for r in rows if r.kind == "pool_bilinear" and r.fidelity}
    downs = sorted((r for r in rows if r.kind == "downscale" and r.fidelity), key=lambda r: r.gflops)
    out = []
    for r in rows:
        if r.kind != "clustering" or not r.fidelity:
            continue
        down = next((d for d in downs if d.gflops >= r.gflops), None)
        out.append({"key": r.key, "gflops": r.gflops, budget.key: r.fidelity.get(budget.key),
                    "pool_bilinear": _side(r, pools.get(_at(r)), budget), "downscale": _side(r, down, budget)})
    return out


def wins(comparison: list[JsonObject], name: str) -> tuple[int, int]:
    """(clustering better, compared) against one baseline."""
    pairs = [c[name]["clustering_better"] for c in comparison
             if c.get(name) and c[name]["clustering_better"] is not None]
    return sum(pairs), len(pairs)


def to_time(rows: list[Row], budget: Budget, baseline_gflops: float, timed: int) -> list[Row]:
    """The rows to time, in order: the `timed` cheapest clustering plans within the budget and cheaper than the
    unpatched model, the recipe's plan, and the baselines matched to the cheapest few; rows timed already not."""
    fit = sorted((r for r in rows if r.kind == "clustering" and within(r, budget) and r.gflops < baseline_gflops),
                 key=lambda r: r.gflops)[:timed]
    chosen = list(fit)
    recipe = next((r for r in rows if r.recipe), None)
    if recipe is not None and recipe not in chosen:
        chosen.append(recipe)
    by_key = {c["key"]: c for c in matched(rows, budget)}
    for r in fit[:BASELINES_MATCHED]:
        for name in ("pool_bilinear", "downscale"):
            other = (by_key.get(r.key) or {}).get(name)
            twin = next((x for x in rows if other and x.key == other["key"]), None)
            if twin is not None and twin not in chosen:
                chosen.append(twin)
    return [r for r in chosen if r.speedup is None]
