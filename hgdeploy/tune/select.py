"""The rules `hgdeploy tune` decides by, on the ledger's rows: which rows keep the budget, which to time, the
best plan, and the baselines matched to each plan at no less cost.

The best row is the fastest clustering plan within the budget that is faster than the unpatched model; there
may be none. Pure functions of rows, no model.
"""

from __future__ import annotations

from hgdeploy.core.files import JsonObject
from hgdeploy.tune.ledger import Row
from hgdeploy.tune.space import Budget

BASELINES_MATCHED = 3  # the cheapest plans within the budget always timed, with their pooling and downscaled baselines


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


def fits_cheapest(rows: list[Row], budget: Budget, baseline_gflops: float) -> list[Row]:
    """Clustering plans within the budget and cheaper than the unpatched model, cheapest first."""
    return sorted((r for r in rows if r.kind == "clustering" and within(r, budget) and r.gflops < baseline_gflops),
                  key=lambda r: r.gflops)


def twins(rows: list[Row], row: Row, budget: Budget) -> dict[str, Row | None]:
    """A clustering row's matched baselines among `rows`: kind -> row (None where not scored yet)."""
    entry = next((c for c in matched(rows, budget) if c["key"] == row.key), {})
    by_key = {r.key: r for r in rows}
    return {name: by_key.get((entry.get(name) or {}).get("key")) for name in ("pool_bilinear", "downscale")}


def must_count(timed: int) -> int:
    """How many of the cheapest plans within the budget are always timed, with their matched baselines."""
    return min(timed, BASELINES_MATCHED)


def to_time(rows: list[Row], budget: Budget, baseline_gflops: float, timed: int) -> tuple[list[Row], list[Row]]:
    """The rows to time, in order, as (must, more): must, the cheapest `must_count(timed)` clustering plans within
    the budget and cheaper than the unpatched model, each followed by its matched baselines (their time is
    reserved from the start); more, the recipe's plan and the next cheapest plans up to `timed` (timed while
    --time-limit allows). Rows timed already are left out."""
    fit = fits_cheapest(rows, budget, baseline_gflops)[:timed]
    must: list[Row] = []
    more: list[Row] = []
    for r in fit[:must_count(timed)]:
        _add(must, [r, *twins(rows, r, budget).values()])
    _add(more, [next((x for x in rows if x.recipe), None), *fit], must)
    return [r for r in must if r.speedup is None], [r for r in more if r.speedup is None]


def _add(into: list[Row], rows: list[Row | None], besides: list[Row] | None = None) -> None:
    """Append each row not yet in `into` or `besides` (by key)."""
    for r in rows:
        if r is not None and all(r.key != x.key for x in [*into, *(besides or [])]):
            into.append(r)
