"""The files `hgdeploy tune` leaves for a user to read and reuse: tune.json (the ledger), tune.md, tune.png and
best.toml (the best plan as a recipe). Rendering only: what is best and what is matched is decided in `select`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import tomli_w

from hgdeploy.core.files import JsonObject, write_atomic, write_atomic_bytes
from hgdeploy.measure.report import relative_speed, speedup_text
from hgdeploy.tune.ledger import Ledger, Row
from hgdeploy.tune.select import faster_baselines, within, wins
from hgdeploy.tune.space import Budget

TUNE_FILES = ("tune.json", "tune.md", "tune.png", "best.toml")
KIND_LABELS = {"clustering": "clustering", "pool_bilinear": "avg-pool + bilinear", "downscale": "downscaled input"}
# [cluster] keys a best.toml states (ClusterPlan fields a recipe takes).
CLUSTER_KEYS = ("alpha", "grid", "reconstruct_after", "neighbours", "iters", "tau", "k", "reconstruction", "form",
                "reconstruct_on", "reconstruct_from", "method")


# ---------------------------------------------------------------------------------------------- best.toml


def cluster_section(plan: JsonObject) -> JsonObject:
    """The [cluster] table of a row's plan, as a recipe writes it (form as resolved for the device it was timed
    on, tau as calibrated)."""
    section = {k: plan[k] for k in CLUSTER_KEYS if k in plan and plan[k] is not None}
    if plan.get("clustering_form"):
        section["form"] = plan["clustering_form"]
    if section.get("method") == "cluster":
        del section["method"]
    return section


def best_recipe(recipe_values: JsonObject, plan: JsonObject, header: list[str], recipe_name: str) -> str:
    """A recipe any command takes: the tuned recipe's values with the best plan's [cluster] (no [ci]: CI
    shapes belong to the bundled recipes) and a [tuned] table: the recipe it comes from and its name, which gives
    the commands' default folder (runs/<name>, not runs/best for every tuned file)."""
    data = {k: v for k, v in recipe_values.items() if k not in ("cluster", "ci", "tuned")}
    data["cluster"] = cluster_section(plan)
    origin = recipe_values.get("tuned", {}).get("recipe", recipe_name)  # a tuned recipe tuned again: its origin
    data = {"tuned": {"recipe": origin, "name": tuned_name(origin, data)}} | data
    lines = [*header, f"Commands given this file use runs/{data['tuned']['name']}/ as their default folder ([tuned] "
                      f"name); --out chooses another."]
    return "".join(f"# {line}\n" for line in lines) + "\n" + tomli_w.dumps(data)


def tuned_name(origin: str, data: JsonObject) -> str:
    """<recipe>-tuned-a<alpha>-<grid>-<6 hex digits of the values>: readable, and two tuned files with other
    values never share a folder."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:6]
    cluster = data["cluster"]
    name = f"{origin}-tuned-a{cluster['alpha']}-{cluster['grid']}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-") or f"tuned-{digest}"


# ---------------------------------------------------------------------------------------------- tune.md


def plan_text(row: Row) -> str:
    p = row.plan
    if row.kind == "downscale":
        return f"input {p['input_size']}"
    text = f"alpha {p['alpha']}, {p['grid']}, rebuilt after {p['reconstruct_after']}"
    if row.kind == "clustering":
        text += f", iters {p['iters']}, {p['reconstruct_from']}, tau {p['tau']:.3g}"
        if p.get("clustering_form"):
            text += f", {p['clustering_form']}"
    return text


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _value(row: Row | None, budget: Budget) -> float | None:
    return None if row is None else (row.fidelity or {}).get(budget.key)


def _ci_cell(row: Row) -> str:
    if row.speedup is None:
        return "—"
    return "too few rounds" if row.speedup_ci is None else f"{row.speedup_ci[0]:.2f}–{row.speedup_ci[1]:.2f}"


def speed_of(row: Row) -> str:
    """A timed row's speed-up against the unpatched model in words, with its interval (the one rule)."""
    return "not timed" if row.speedup is None else relative_speed(row.speedup, row.speedup_ci)


def rows_table(rows: list[Row], budget: Budget, best: Row | None) -> list[str]:
    """Timed rows by speed-up, then the others by GFLOPs."""
    timed = sorted((r for r in rows if r.speedup is not None), key=lambda r: -(r.speedup or 0))
    rest = sorted((r for r in rows if r.speedup is None), key=lambda r: r.gflops)
    lines = [f"| kind | plan | GFLOPs | latency ms | speed-up | speed-up 95 % CI | {budget.key} | "
             f"{budget.confidence:.0%} bound | within budget |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in timed + rest:
        mark = " **(best)**" if best is not None and r.key == best.key else ""
        mark += " (recipe)" if r.recipe else ""
        lines.append(f"| {KIND_LABELS[r.kind]}{mark} | {plan_text(r)} | {r.gflops:.4g} | "
                     f"{_num(r.latency_ms, '.1f')} | {_num(r.speedup, '.3f')} | {_ci_cell(r)} | "
                     f"{_num(_value(r, budget), '.4f')} | "
                     f"{_num(budget.bound(r.fidelity) if r.fidelity else None, '.4f')} | "
                     f"{'yes' if within(r, budget) else 'no'} |")
    return lines


def verdict(ledger: Ledger) -> list[str]:
    """tune.md's opening: the budget, the best plan (and how it did on held-out images) or that there is none,
    the recipe's own plan, and any baseline that beat it."""
    budget, best, base, ctx = ledger.budget, ledger.best, ledger.baseline, ledger.context
    lines = [f"# hgdeploy tune: {ctx['recipe']} on {ctx['engine']}", "",
             f"Budget: **{budget}** (fidelity against the unpatched model on {len(ctx['images'])} images; a plan meets "
             f"it when the one-sided {budget.confidence:.0%} confidence bound of its mean does). "
             f"Unpatched: {_num(base and base.gflops, '.4g')} GFLOPs"
             + (f", {base.latency_ms:.4g} ms" if base and base.latency_ms else "") + f". State: {ledger.state}.", ""]
    if ledger.structure_check_only:
        lines += [f"Note: {ledger.structure_check_only}.", ""]
    if best is not None:
        lines += [f"**Best plan:** {plan_text(best)}: {speed_of(best)}, "
                  f"{_num(best.latency_ms, '.4g')} ms, {budget.key} {_num(_value(best, budget), '.4f')}, "
                  f"{best.gflops:.4g} GFLOPs. `best.toml` holds it as a recipe."]
        hold = best.holdout
        if hold:
            lines += ["", f"On {hold['images']} held-out images it did not tune on: {budget.key} "
                          f"{_num(hold['fidelity'].get(budget.key), '.4f')} "
                          f"({'within' if hold['within_budget'] else 'NOT within'} the budget)."]
    else:
        lines += ["**No plan is both within the budget and faster than the unpatched model on this device**: "
                  "deploy the unpatched model (or loosen the budget)."]
    recipe = ledger.recipe_row()
    if recipe is not None:
        lines += ["", f"The recipe's own plan: {speed_of(recipe)}, {budget.key} "
                      f"{_num(_value(recipe, budget), '.4f')}."]
    for r in faster_baselines(ledger.rows, budget, best):
        lines += ["", f"Note: the baseline {KIND_LABELS[r.kind]} ({plan_text(r)}) is within the budget and "
                      f"faster by the medians ({speedup_text(r.speedup or 0.0, r.speedup_ci, 3)})."]
    return lines


def comparison_table(ledger: Ledger) -> list[str]:
    """Clustering against the parameter-free baselines at equal cost: the counts and one line per plan."""
    comp, budget = ledger.comparison or [], ledger.budget
    if not comp:
        return []
    pw, pn = wins(comp, "pool_bilinear")
    dw, dn = wins(comp, "downscale")
    lines = ["", "## Clustering against the parameter-free baselines at equal cost", "",
             f"{budget.key} of clustering is higher than average-pool + bilinear at the same alpha, grid and "
             f"reconstruction layer in {pw} of {pn} plans, and higher than the smallest downscaled input with at "
             f"least the plan's GFLOPs in {dw} of {dn}.", "",
             f"| clustering plan | GFLOPs | {budget.key} | avg-pool + bilinear | downscaled input (GFLOPs) |",
             "|---|---:|---:|---:|---:|"]
    by_key = {r.key: r for r in ledger.rows}
    for c in comp:
        pool, down = c.get("pool_bilinear"), c.get("downscale")
        lines.append(f"| {plan_text(by_key[c['key']])} | {c['gflops']:.4g} | {_num(c[budget.key], '.4f')} | "
                     f"{_num(pool and pool[budget.key], '.4f')} | "
                     + (f"{_num(down[budget.key], '.4f')} ({down['gflops']:.4g}, "
                        f"{by_key[down['key']].plan['input_size']})" if down else "—") + " |")
    return lines


def skipped_lines(ledger: Ledger) -> list[str]:
    """What --time-limit left out, apart from the pruned plans: not scored, or scored and not timed."""
    if not ledger.skipped:
        return []
    scoring = [s for s in ledger.skipped if s["phase"] == "scoring"]
    plans = sum(1 for s in scoring if s["kind"] == "clustering")
    timing = ledger.skipped_count("timing")
    limit = f"{ledger.limit_s / 60:g} min" if ledger.limit_s else "the limit"
    return ["", f"Skipped for time (--time-limit {limit}): {plans} plans and {len(scoring) - plans} baselines not "
                f"scored, {timing} scored rows not timed. The same command with the same --out resumes them."]


def render_markdown(ledger: Ledger, plot: str | None) -> str:
    lines = verdict(ledger)
    if plot:
        lines += ["", f"![speed-up and fidelity of every measured plan]({plot})"]
    lines += ["", "## Measured plans", ""] + rows_table(ledger.rows, ledger.budget, ledger.best)
    lines += comparison_table(ledger)
    if ledger.pruned:
        lines += ["", f"{len(ledger.pruned)} plans were pruned (not run): "
                  + "; ".join(sorted({str(p['reason']) for p in ledger.pruned})) + "."]
    lines += skipped_lines(ledger)
    backend, ctx = ledger.backend, ledger.context
    machine, v = backend.get("machine", {}), backend.get("versions", {})
    lines += ["", f"Measured by `hgdeploy tune` with the {ctx['engine']} profile ({backend.get('device', '?')}, "
                  f"{machine.get('cpu_count', '?')} CPU cores, {machine.get('machine', '?')}) in "
                  f"{ledger.elapsed_s / 60:.1f} min; " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
    return "\n".join(lines) + "\n"
# ---------------------------------------------------------------------------------------------- plot

COLOURS = {"clustering": "tab:blue", "pool_bilinear": "tab:orange", "downscale": "tab:green"}


def render_plot(ledger: Ledger) -> bytes:
    """Two panels: fidelity against GFLOPs (every scored row) and speed-up against fidelity (timed rows), each
    with the budget line, the unpatched model's point and a legend; the best plan circled. Points far from the
    budget are drawn on the panel's edge as triangles pointing where they are, and the panel's title says how many
    and their range."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    budget, best = ledger.budget, ledger.best
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    lo, hi = _y_range(budget)
    clipped: dict[int, list[float]] = {id(left): [], id(right): []}
    for kind, colour in COLOURS.items():
        scored = [r for r in ledger.rows if r.kind == kind and _value(r, budget) is not None]
        timed = [r for r in scored if r.speedup is not None]
        for ax, pts, x, size in ((left, scored, "gflops", 18), (right, timed, "speedup", 24)):
            inside = [r for r in pts if lo <= (_value(r, budget) or 0.0) <= hi]
            outside = [r for r in pts if r not in inside]
            if inside:
                ax.scatter([getattr(r, x) for r in inside], [_value(r, budget) for r in inside], s=size, color=colour,
                           label=KIND_LABELS[kind])
            if outside:  # far from the budget: drawn on the edge, pointing where they are
                values = [_value(r, budget) or 0.0 for r in outside]
                clipped[id(ax)] += values
                ax.scatter([getattr(r, x) for r in outside], [lo if v < lo else hi for v in values], s=size,
                           color=colour, marker="v" if budget.op == ">=" else "^",
                           label=f"{KIND_LABELS[kind]} (off the scale)")
    full = 0.0 if budget.op == "<=" else 1.0
    if ledger.baseline is not None:
        left.scatter([ledger.baseline.gflops], [full], marker="*", s=120, color="black", label="unpatched")
    right.scatter([1.0], [full], marker="*", s=120, color="black", label="unpatched")
    if best is not None:
        left.scatter([best.gflops], [_value(best, budget)], s=140, facecolors="none", edgecolors="red", label="best")
        right.scatter([best.speedup], [_value(best, budget)], s=140, facecolors="none", edgecolors="red",
                      label="best")
    titles = ((left, "fidelity at each cost (tuning images)"), (right, "timed plans"))
    for (ax, title), xlabel in zip(titles, ("GFLOPs", f"speed-up on {ledger.context['engine']}")):
        ax.axhline(budget.value, color="grey", linestyle="--", linewidth=1, label=f"budget {budget}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{budget.key} vs unpatched")
        ax.grid(alpha=0.3)
        ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        note = off_scale_note(clipped[id(ax)], lo, hi)
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    right.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    left.legend(fontsize=7, loc="center right")
    right.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def off_scale_note(values: list[float], lo: float, hi: float) -> str:
    """What a panel's edge triangles stand for: how many points lie beyond its fidelity range, and their range."""
    below, above = [v for v in values if v < lo], [v for v in values if v > hi]
    parts = [f"{len(vs)} point{'s' if len(vs) > 1 else ''} {where} {edge:.3f} ({min(vs):.4f}–{max(vs):.4f}) drawn "
             f"on the {side} edge" for vs, where, edge, side in ((below, "below", lo, "lower"),
                                                                  (above, "above", hi, "upper")) if vs]
    return "; ".join(parts)


def _y_range(budget: Budget) -> tuple[float, float]:
    """The fidelity range a plot shows: from the unpatched value to a few budget margins past the budget
    (points beyond it sit on the edge)."""
    if budget.op == ">=":
        margin = max(1.0 - budget.value, 1e-3)
        return budget.value - 4 * margin, 1.0
    margin = max(budget.value, 1e-3)
    return 0.0, budget.value + 4 * margin


OUTPUTS = ("tune.png", "tune.md", "best.toml")  # what a finished run concludes from tune.json


def remove_outputs(folder: Path) -> list[str]:
    """Remove the files a finished run derives from tune.json (those that exist; their names returned): a run
    that resumes, or stops before its end, leaves tune.json alone, never files that concluded another run."""
    removed = [n for n in OUTPUTS if (folder / n).exists()]
    for name in OUTPUTS:
        (folder / name).unlink(missing_ok=True)
    return removed


def write_results(ledger: Ledger, recipe_values: JsonObject, header: list[str]) -> None:
    """tune.json with the conclusion first, then tune.png, tune.md and best.toml (when there is a best plan), each
    written atomically in place: the folder never goes away, and tune.md or best.toml exist only beside the
    tune.json they come from (the run removed the earlier ones when it started)."""
    folder = ledger.folder
    folder.mkdir(parents=True, exist_ok=True)
    ledger.save()
    write_atomic_bytes(folder / "tune.png", render_plot(ledger))
    write_atomic(folder / "tune.md", render_markdown(ledger, "tune.png"))
    if ledger.best is not None:
        write_atomic(folder / "best.toml", best_recipe(recipe_values, ledger.best.plan, header,
                                                       ledger.context["recipe"]))
    else:
        (folder / "best.toml").unlink(missing_ok=True)
