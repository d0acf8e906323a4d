"""What the commands print on stdout: tables (rich, never markup), the bench, eval and tune summaries."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Iterable

from hgdeploy.core.files import JsonObject

if TYPE_CHECKING:
    from hgdeploy.tune.ledger import Ledger


def console() -> Any:
    """A console on stdout; piped or redirected, tables get the width they need (nothing cut at 80 columns)."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None,
           no_wrap: tuple[int, ...] = (), lines: bool = False) -> None:
    """A table on stdout; cells are text, never rich markup ("[model]" stays "[model]")."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", title=title, title_justify="left", show_lines=lines)
    for i, col in enumerate(columns):
        table.add_column(Text(col), no_wrap=i in no_wrap)
    for row in rows:
        table.add_row(*(Text(cell(v)) for v in row))
    console().print(table)


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "—" if value is None else str(value)


def emit(report: JsonObject, as_json: bool, keys: list[str] | None = None) -> None:
    """`keys` of a command's report as a table, or as JSON (with the memory section, which the table leaves to the
    ✓ lines on stderr)."""
    shown = {k: report[k] for k in (keys or report) if k in report}
    if as_json:
        shown |= {"memory": report["memory"]} if "memory" in report else {}
        print(json.dumps(shown, indent=2))
        return
    table(("key", "value"), flatten(shown), no_wrap=(0,))


def flatten(d: JsonObject, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if key in ("per_image", "per_output", "values", "versions", "machine", "passes"):
            continue
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and len(value) > LIST_SHOWN:  # node names and the like: --json has them all
            rows.append((f"{prefix}{key}", f"{len(value)} items: {', '.join(map(str, value[:LIST_SHOWN]))}, …"))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


LIST_SHOWN = 3  # a longer list in a key/value table shows its length and first items


RUNNER_NAMES = {"baseline": "engine, baseline", "patched": "engine, patched (deployed graph)",
                "patched_unoptimized": "engine, patched before the graph passes",
                "torch_baseline": "torch eager, baseline", "torch_patched": "torch eager, patched"}


def print_bench(report: JsonObject) -> None:
    """One row per runner, then the ratios with their intervals and the verdict (and what the graph passes did,
    where the graph before them was timed): what `hgdeploy bench` and `optimize` are for."""
    from hgdeploy.measure.report import passes_verdict, speed_verdict, speedup_text

    plan, g = report.get("plan") or {}, report.get("gflops") or {}
    backend = report.get("backend", {})
    lines = []
    if plan:
        lines.append(f"plan: alpha={plan['alpha']}, {plan['num_clusters']} clusters ({plan['grid']}) of "
                     f"{plan['num_tokens']} tokens, rebuilt after {plan['reconstruct_after']}"
                     + (f", {plan['clustering_form']} clustering" if plan.get("clustering_form") else ""))
    if g:
        lines.append(f"GFLOPs: {g['baseline']:.2f} -> {g['patched']:.2f} (ratio {g['patched'] / g['baseline']:.3f}, "
                     f"clustering + reconstruction {g['clustering']:.3f})")
    print("\n".join(lines))
    lat = report["latency"]
    table(("runner", "median ms", "p90 ms", "min ms", "runs"),
           ([RUNNER_NAMES.get(k, k), f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", f"{t['min_ms']:.2f}", t["runs"]]
            for k, t in lat.items()), title=f"{backend.get('name', '')}: interleaved runs after warm-up",
           no_wrap=(0,))
    print(f"speedup (baseline / patched median): {speedup_text(report['speedup'], report.get('speedup_ci'), 3)}"
          + (f"; torch eager: {speedup_text(report['speedup_torch'], report.get('speedup_torch_ci'), 3)}"
             if "speedup_torch" in report else ""))
    print(speed_verdict(report))
    passes = passes_verdict(report)
    if passes:
        print(passes)


def print_batches(report: JsonObject) -> None:
    """One row per batch size: the medians, images/s and the speed-up (with its interval); then the largest."""
    from hgdeploy.measure.report import band_words, speedup_text

    rows = report["batches"]
    torch = all("speedup_torch" in r for r in rows)
    header = ("batch", "baseline ms", "patched ms", "baseline img/s", "patched img/s", "speed-up")
    cells = [[str(r["batch"]), f"{r['latency_ms']['baseline']:.2f}", f"{r['latency_ms']['patched']:.2f}",
              f"{r['images_per_s']['baseline']:.1f}", f"{r['images_per_s']['patched']:.1f}",
              speedup_text(r["speedup"], r.get("speedup_ci"), 3)]
             + ([speedup_text(r["speedup_torch"], r.get("speedup_torch_ci"), 3)] if torch else []) for r in rows]
    table(header + (("torch speed-up",) if torch else ()), cells,
          title=f"{report.get('backend', {}).get('name', '')}: baseline and patched interleaved at each batch")
    best = max(rows, key=lambda r: r["speedup"])
    print(f"largest speed-up: {speedup_text(best['speedup'], best.get('speedup_ci'), 3)} at batch {best['batch']}: "
          f"{band_words(best.get('speedup_ci'))}")


PART_NAMES = {"clustering": "clustering", "reconstruction": "reconstruction", "attention": "attention",
              "mlp": "MLP", "rest": "rest (embedding, norms, head, ORT's own kernels)"}
TOP_OPS = 12  # op types shown by name; the others are summed in one row


def print_profile(profile: JsonObject) -> None:
    """Where the milliseconds go: kernel ms per run by part, then by op type, baseline beside patched."""
    graphs = profile["graphs"]
    keys = list(graphs)

    def ms_pct(g: JsonObject, ms: float) -> list[str]:
        return [f"{ms:.3f}", f"{100 * ms / g['kernels_ms']:.1f}%" if g["kernels_ms"] else "—"]

    rows = [[PART_NAMES.get(part, part), *(x for k in keys for x in ms_pct(graphs[k], graphs[k]["by_part"][part]))]
            for part in graphs[keys[0]]["by_part"]]
    rows.append(["kernels, total", *(x for k in keys for x in ms_pct(graphs[k], graphs[k]["kernels_ms"]))])
    rows.append(["run, wall (profiler included)", *(x for k in keys for x in (f"{graphs[k]['run_ms']:.3f}", ""))])
    table(("part", *(x for k in keys for x in (f"{k} ms", "%"))), rows, no_wrap=(0,),
          title=f"{profile['engine']}: where the milliseconds go (median per node over "
                f"{graphs[keys[0]]['runs']} profiled runs, summed)")
    ops = sorted({op for k in keys for op in graphs[k]["by_op"]},
                 key=lambda op: (-max(graphs[k]["by_op"].get(op, 0.0) for k in keys), op))
    shown, other = ops[:TOP_OPS], ops[TOP_OPS:]
    rows = [[op, *(f"{graphs[k]['by_op'].get(op, 0.0):.3f}" for k in keys)] for op in shown]
    if other:
        rows.append([f"{len(other)} other op types", *(f"{sum(graphs[k]['by_op'].get(o, 0.0) for o in other):.3f}"
                                                      for k in keys)])
    table(("op type", *(f"{k} ms" for k in keys)), rows, title="by op type", no_wrap=(0,))
    unscoped = "; ".join(f"{k} {graphs[k]['unscoped_kernels']} of {graphs[k]['kernels']}, "
                         f"{graphs[k]['unscoped_ms']:.3f} ms" for k in keys)
    print(f"kernels without a module path (nodes ORT or the graph passes made), counted in rest: {unscoped}")


def print_eval(report: JsonObject) -> None:
    """The tables eval.md leads with, from the same rows (the same precision, the Δ columns, the "vs unpatched"
    labels), then the gate."""
    from hgdeploy.evaluation.report import AGREEMENT_TITLE, TRUTH_TITLE, agreement_table, gate_sentence, truth_table

    d = report["dataset"]
    print(f"{report['recipe']['name']} on {d['path']} ({d['layout']}, {d['images']} images), engine "
          f"{report['backend']['name']}")
    truth = truth_table(report)
    if truth is not None:
        table(truth[0], truth[1], title=TRUTH_TITLE, no_wrap=(0,))
    header, rows = agreement_table(report)
    table(header, rows, title=AGREEMENT_TITLE, no_wrap=(0,))
    print(gate_sentence(report, markdown=False))
    if report.get("structure_check_only"):
        print(f"note: {report['structure_check_only']}")


def print_tune(ledger: Ledger) -> None:
    """The timed plans by speed-up, then the verdict: what tune.md leads with."""
    from hgdeploy.measure.report import relative_speed
    from hgdeploy.tune.report import plan_text

    budget = ledger.budget
    timed = sorted((r for r in ledger.rows if r.speedup is not None), key=lambda r: -(r.speedup or 0))
    table(("kind", "plan", "GFLOPs", "ms", "speed-up", budget.key, f"{budget.confidence:.0%} bound"),
          ([r.kind + (" (recipe)" if r.recipe else ""), plan_text(r), r.gflops, r.latency_ms, r.speedup,
            (r.fidelity or {}).get(budget.key), budget.bound(r.fidelity or {})] for r in timed),
          title=f"timed plans on {ledger.context['engine']} (budget {budget})", no_wrap=(0, 1))
    best = ledger.best
    scored = sum(1 for r in ledger.rows if r.kind == "clustering")
    print(f"{scored} clustering plans scored, {len(ledger.pruned)} pruned, {len(timed)} rows timed "
          f"({ledger.state}, {ledger.elapsed_s / 60:.1f} min)")
    if ledger.skipped:
        print(f"skipped for time: {ledger.skipped_count('scoring')} plans and baselines not scored, "
              f"{ledger.skipped_count('timing')} scored rows not timed (the same command resumes them)")
    if best is None or best.speedup is None:
        print("no plan is within the budget and faster than the unpatched model on this device: deploy the "
              "unpatched model or loosen the budget")
        return
    print(f"best: {plan_text(best)}, {relative_speed(best.speedup, best.speedup_ci)}, {budget.key} "
          f"{(best.fidelity or {})[budget.key]:.4f}")
    hold = best.holdout
    if hold:
        value = hold["fidelity"].get(budget.key)
        print(f"held-out ({hold['images']} images): {budget.key} {cell(value)} "
              f"{'within' if hold['within_budget'] else 'MISSES'} the budget")


def print_families(rows: list[JsonObject]) -> None:
    """One row per family: what it is, its [model] options, its outputs and the bundled recipes that use it."""
    table(("family", "what", "[model] options", "outputs", "bundled recipes"),
          ([r["family"], r["summary"], ", ".join(r["options"]) or "-",
            ", ".join(f"{k} ({v})" for k, v in r["outputs"].items()), "\n".join(r["recipes"])] for r in rows),
          no_wrap=(0, 4), lines=True)


def print_triton(report: JsonObject) -> None:
    """One row per model of the repository (its graph, batch, tensors as Triton declares them), then where the
    README on serving it is."""
    def tensors(ts: list[JsonObject]) -> str:
        return "\n".join(f"{t['name']} {t['data_type'].removeprefix('TYPE_')} {t['dims']}" for t in ts)

    models = report["models"]
    table(("model", "graph", "max_batch_size", "inputs", "outputs"),
          ([name, m["graph"], m["max_batch_size"], tensors(m["inputs"]), tensors(m["outputs"])]
           for name, m in models.items()), no_wrap=(0, 1))
    print(f"Triton {report['triton_release']} on the {report['device']}, engine profile {report['engine']}: "
          f"how to start it and query it is in {report['repository']}/README.md")
