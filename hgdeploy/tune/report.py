"""What `hgdeploy tune` concludes from its measured rows: the best plan, the comparisons at equal cost, and the
files a user reads and reuses (tune.json, tune.md, tune.png, best.toml).

A row is one measured plan: kind "clustering", "pool_bilinear" or "downscale", its [cluster] values (or the
input size), GFLOPs, fidelity on the tuning images and, when timed, latency and speed-up against the
unpatched model timed interleaved with it. The best row is the fastest clustering plan within the budget
that is faster than the unpatched model; there may be none.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import tomli_w

from hgdeploy.core.files import to_json, write_atomic, write_atomic_bytes
from hgdeploy.tune.space import Budget

TUNE_FILES = ("tune.json", "tune.md", "tune.png", "best.toml")
KIND_LABELS = {"clustering": "clustering", "pool_bilinear": "avg-pool + bilinear", "downscale": "downscaled input"}
# [cluster] keys a best.toml states (ClusterPlan fields a recipe takes).
CLUSTER_KEYS = ("alpha", "grid", "reconstruct_after", "neighbours", "iters", "tau", "k", "reconstruction", "form",
                "reconstruct_on", "reconstruct_from", "method")


def within(row: dict[str, Any], budget: Budget) -> bool:
    return row.get("fidelity") is not None and budget.met(row["fidelity"])


def select_best(rows: list[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """The timed clustering row with the highest speed-up, within the budget and faster than the baseline."""
    fit = [r for r in rows if r["kind"] == "clustering" and within(r, budget) and (r.get("speedup") or 0) > 1.0]
    return max(fit, key=lambda r: r["speedup"]) if fit else None


def faster_baselines(rows: list[dict[str, Any]], budget: Budget, best: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Baseline rows within the budget that beat the best plan's measured speed-up (or any, without one)."""
    bar = best["speedup"] if best else 1.0
    return [r for r in rows if r["kind"] != "clustering" and within(r, budget) and (r.get("speedup") or 0) > bar]


def matched(rows: list[dict[str, Any]], budget: Budget) -> list[dict[str, Any]]:
    """For every scored clustering row: the pooling row at its alpha, grid and reconstruction layer, and the
    smallest downscaled input with at least its GFLOPs (the baseline never gets less compute), side by side."""
    pools = {(r["plan"]["alpha"], r["plan"]["grid"], r["plan"]["reconstruct_after"]): r
             for r in rows if r["kind"] == "pool_bilinear" and r.get("fidelity")}
    downs = sorted((r for r in rows if r["kind"] == "downscale" and r.get("fidelity")), key=lambda r: r["gflops"])
    out = []
    for r in rows:
        if r["kind"] != "clustering" or not r.get("fidelity"):
            continue
        pool = pools.get((r["plan"]["alpha"], r["plan"]["grid"], r["plan"]["reconstruct_after"]))
        down = next((d for d in downs if d["gflops"] >= r["gflops"]), None)
        value = r["fidelity"].get(budget.key)
        entry: dict[str, Any] = {"key": r["key"], "gflops": r["gflops"], budget.key: value}
        for name, other in (("pool_bilinear", pool), ("downscale", down)):
            theirs = other["fidelity"].get(budget.key) if other else None
            entry[name] = None if other is None else {
                "key": other["key"], "gflops": other["gflops"], budget.key: theirs,
                "clustering_better": None if theirs is None or value is None else
                (value >= theirs if budget.op == ">=" else value <= theirs) and value != theirs}
        out.append(entry)
    return out


def wins(comparison: list[dict[str, Any]], name: str) -> tuple[int, int]:
    """(clustering better, compared) against one baseline."""
    pairs = [c[name]["clustering_better"] for c in comparison
             if c.get(name) and c[name]["clustering_better"] is not None]
    return sum(pairs), len(pairs)


# ---------------------------------------------------------------------------------------------- best.toml


def cluster_section(row: dict[str, Any]) -> dict[str, Any]:
    """The [cluster] table of a row's plan, as a recipe writes it (form as resolved for the device it was timed
    on, tau as calibrated)."""
    plan = row["plan"]
    section = {k: plan[k] for k in CLUSTER_KEYS if k in plan and plan[k] is not None}
    if plan.get("clustering_form"):
        section["form"] = plan["clustering_form"]
    if section.get("method") == "cluster":
        del section["method"]
    return section


def best_recipe(recipe_values: dict[str, Any], row: dict[str, Any], header: list[str]) -> str:
    """A recipe any command takes: the tuned recipe's values with the best plan's [cluster] (no [ci]: CI
    shapes belong to the bundled recipes)."""
    data = {k: v for k, v in recipe_values.items() if k not in ("cluster", "ci")}
    data["cluster"] = cluster_section(row)
    return "".join(f"# {line}\n" for line in header) + "\n" + tomli_w.dumps(data)


# ---------------------------------------------------------------------------------------------- tune.md


def plan_text(row: dict[str, Any]) -> str:
    p = row["plan"]
    if row["kind"] == "downscale":
        return f"input {p['input_size']}"
    text = f"alpha {p['alpha']}, {p['grid']}, rebuilt after {p['reconstruct_after']}"
    if row["kind"] == "clustering":
        text += f", iters {p['iters']}, {p['reconstruct_from']}, tau {p['tau']:.3g}"
        if p.get("clustering_form"):
            text += f", {p['clustering_form']}"
    return text


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def rows_table(rows: list[dict[str, Any]], budget: Budget, best: dict[str, Any] | None) -> list[str]:
    """Timed rows by speed-up, then the others by GFLOPs."""
    timed = sorted((r for r in rows if r.get("speedup") is not None), key=lambda r: -r["speedup"])
    rest = sorted((r for r in rows if r.get("speedup") is None), key=lambda r: r["gflops"])
    lines = [f"| kind | plan | GFLOPs | latency ms | speed-up | {budget.key} | {budget.confidence:.0%} bound | "
             f"within budget |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in timed + rest:
        mark = " **(best)**" if best is not None and r["key"] == best["key"] else ""
        mark += " (recipe)" if r.get("recipe") else ""
        value = (r.get("fidelity") or {}).get(budget.key)
        lines.append(f"| {KIND_LABELS[r['kind']]}{mark} | {plan_text(r)} | {r['gflops']:.4g} | "
                     f"{_num(r.get('latency_ms'), '.1f')} | {_num(r.get('speedup'), '.3f')} | {_num(value, '.4f')} | "
                     f"{_num(budget.bound(r['fidelity']) if r.get('fidelity') else None, '.4f')} | "
                     f"{'yes' if within(r, budget) else 'no'} |")
    return lines


def render_markdown(result: dict[str, Any], budget: Budget, plot: str | None) -> str:
    rows, best = result["rows"], result.get("best")
    ctx, base = result["context"], result["baseline"]
    lines = [f"# hgdeploy tune: {ctx['recipe']} on {ctx['engine']}", "",
             f"Budget: **{budget}** (fidelity against the unpatched model on {len(ctx['images'])} images; a plan meets "
             f"it when the one-sided {budget.confidence:.0%} confidence bound of its mean does). "
             f"Unpatched: {base['gflops']:.4g} GFLOPs"
             + (f", {base['latency_ms']:.4g} ms" if base.get("latency_ms") else "")
             + f". State: {result['state']}.", ""]
    if result.get("structure_check_only"):
        lines += [f"Note: {result['structure_check_only']}.", ""]
    if best is not None:
        lines += [f"**Best plan:** {plan_text(best)}: {best['speedup']:.3f}x faster than the unpatched model "
                  f"({best['latency_ms']:.4g} ms), {budget.key} {best['fidelity'][budget.key]:.4f}, "
                  f"{best['gflops']:.4g} GFLOPs. `best.toml` holds it as a recipe."]
        hold = best.get("holdout")
        if hold:
            lines += ["", f"On {hold['images']} held-out images it did not tune on: {budget.key} "
                          f"{_num(hold['fidelity'].get(budget.key), '.4f')} "
                          f"({'within' if hold['within_budget'] else 'NOT within'} the budget)."]
    else:
        lines += ["**No plan is both within the budget and faster than the unpatched model on this device**: "
                  "deploy the unpatched model (or loosen the budget)."]
    recipe = next((r for r in rows if r.get("recipe")), None)
    if recipe is not None:
        lines += ["", f"The recipe's own plan: {_num(recipe.get('speedup'), '.3f')}x, {budget.key} "
                      f"{_num((recipe.get('fidelity') or {}).get(budget.key), '.4f')}."]
    for r in faster_baselines(rows, budget, best):
        lines += ["", f"Note: the baseline {KIND_LABELS[r['kind']]} ({plan_text(r)}) is within the budget and "
                      f"faster ({r['speedup']:.3f}x)."]
    if plot:
        lines += ["", f"![speed-up and fidelity of every measured plan]({plot})"]
    lines += ["", "## Measured plans", ""] + rows_table(rows, budget, best)
    comp = result.get("comparison") or []
    if comp:
        pw, pn = wins(comp, "pool_bilinear")
        dw, dn = wins(comp, "downscale")
        lines += ["", "## Clustering against the parameter-free baselines at equal cost", "",
                  f"{budget.key} of clustering is higher than average-pool + bilinear at the same alpha, grid and "
                  f"reconstruction layer in {pw} of {pn} plans, and higher than the smallest downscaled input with at "
                  f"least the plan's GFLOPs in {dw} of {dn}.", "",
                  f"| clustering plan | GFLOPs | {budget.key} | avg-pool + bilinear | downscaled input (GFLOPs) |",
                  "|---|---:|---:|---:|---:|"]
        by_key = {r["key"]: r for r in rows}
        for c in comp:
            pool, down = c.get("pool_bilinear"), c.get("downscale")
            lines.append(f"| {plan_text(by_key[c['key']])} | {c['gflops']:.4g} | {_num(c[budget.key], '.4f')} | "
                         f"{_num(pool and pool[budget.key], '.4f')} | "
                         + (f"{_num(down[budget.key], '.4f')} ({down['gflops']:.4g}, "
                            f"{by_key[down['key']]['plan']['input_size']})" if down else "—") + " |")
    pruned = result.get("pruned") or []
    if pruned:
        lines += ["", f"{len(pruned)} plans were not run: " + "; ".join(sorted({p['reason'] for p in pruned})) + "."]
    backend = result.get("backend", {})
    machine = backend.get("machine", {})
    v = backend.get("versions", {})
    lines += ["", f"Measured by `hgdeploy tune` with the {ctx['engine']} profile ({backend.get('device', '?')}, "
                  f"{machine.get('cpu_count', '?')} CPU cores, {machine.get('machine', '?')}) in "
                  f"{result.get('elapsed_s', 0) / 60:.1f} min; " + ", ".join(f"{k} {val}" for k, val in v.items())
              + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plot

COLOURS = {"clustering": "tab:blue", "pool_bilinear": "tab:orange", "downscale": "tab:green"}


def render_plot(result: dict[str, Any], budget: Budget) -> bytes:
    """Two panels: fidelity against GFLOPs (every scored row) and speed-up against fidelity (timed rows), each
    with the budget line and the unpatched model's point; the best plan circled."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, best, base = result["rows"], result.get("best"), result["baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lo, hi = _y_range(budget)
    for kind, colour in COLOURS.items():
        scored = [r for r in rows if r["kind"] == kind and (r.get("fidelity") or {}).get(budget.key) is not None]
        timed = [r for r in scored if r.get("speedup") is not None]
        for ax, pts, x, size in ((left, scored, "gflops", 18), (right, timed, "speedup", 24)):
            inside = [r for r in pts if lo <= r["fidelity"][budget.key] <= hi]
            outside = [r for r in pts if r not in inside]
            if inside:
                ax.scatter([r[x] for r in inside], [r["fidelity"][budget.key] for r in inside], s=size, color=colour,
                           label=KIND_LABELS[kind])
            if outside:  # far from the budget: drawn on the edge, pointing where they are
                ax.scatter([r[x] for r in outside], [lo if r["fidelity"][budget.key] < lo else hi for r in outside],
                           s=size, color=colour, marker="v" if budget.op == ">=" else "^",
                           label=None if inside else KIND_LABELS[kind])
    full = 0.0 if budget.op == "<=" else 1.0
    left.scatter([base["gflops"]], [full], marker="*", s=120, color="black", label="unpatched")
    right.scatter([1.0], [full], marker="*", s=120, color="black", label="unpatched")
    if best is not None:
        left.scatter([best["gflops"]], [best["fidelity"][budget.key]], s=140, facecolors="none", edgecolors="red",
                     label="best")
        right.scatter([best["speedup"]], [best["fidelity"][budget.key]], s=140, facecolors="none", edgecolors="red",
                      label="best")
    for ax, xlabel in ((left, "GFLOPs"), (right, f"speed-up on {result['context']['engine']}")):
        ax.axhline(budget.value, color="grey", linestyle="--", linewidth=1, label=f"budget {budget}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{budget.key} vs unpatched")
        ax.grid(alpha=0.3)
    for ax in (left, right):
        ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
    right.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    left.legend(fontsize=7, loc="lower right")
    left.set_title("fidelity at each cost (tuning images)", fontsize=9)
    right.set_title("timed plans", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _y_range(budget: Budget) -> tuple[float, float]:
    """The fidelity range a plot shows: from the unpatched value to a few budget margins past the budget
    (points beyond it sit on the edge)."""
    if budget.op == ">=":
        margin = max(1.0 - budget.value, 1e-3)
        return budget.value - 4 * margin, 1.0
    margin = max(budget.value, 1e-3)
    return 0.0, budget.value + 4 * margin


def write_results(folder: Path, result: dict[str, Any], budget: Budget, recipe_values: dict[str, Any],
                  header: list[str]) -> None:
    """tune.json always; tune.md and tune.png; best.toml when there is a best plan (a stale one is removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic_bytes(folder / "tune.png", render_plot(result, budget))
    write_atomic(folder / "tune.md", render_markdown(result, budget, "tune.png"))
    best = result.get("best")
    if best is not None:
        write_atomic(folder / "best.toml", best_recipe(recipe_values, best, header))
    else:
        (folder / "best.toml").unlink(missing_ok=True)
    write_atomic(folder / "tune.json", to_json(result))


def save_progress(folder: Path, result: dict[str, Any]) -> None:
    """tune.json alone, after every measured row: an interrupted sweep keeps what it measured."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "tune.json", to_json(result))
