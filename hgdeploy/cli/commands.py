"""One function per subcommand: read its argument groups in the order their inputs are checked, call one library
function, print the result. Exit codes: 0 success, 1 a check failed (EXIT_CHECK_FAILED), 2 bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Callable

from hgdeploy.cli import args as groups
from hgdeploy.cli.show import (emit, print_batches, print_bench, print_eval, print_families, print_profile,
                               print_triton, print_tune)
from hgdeploy.core.errors import EXIT_CHECK_FAILED, EXIT_OK, UserError

if TYPE_CHECKING:
    from hgdeploy.core.recipe import Recipe


def cmd_run(args: argparse.Namespace) -> int:
    from hgdeploy.core import progress
    from hgdeploy.measure.report import render_summary
    from hgdeploy.pipeline import commands

    rec = groups.recipe(args)
    budget = groups.budget(args)
    engine = groups.engine(args, rec)
    photos = groups.photos(args)
    out = groups.run_folder(args, rec, photos)
    report = commands.run(rec, engine, photos, out, budget)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data", ".json", ".md"))
    progress.info(f"wrote {out}/{', '.join(written)}")
    print(json.dumps(report.to_json(), indent=2) if args.json else render_summary(report.to_json()))
    return parity_exit(report)


def cmd_export(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import commands

    rec = groups.recipe(args)
    engine = groups.engine(args, rec, runs_here=False)
    emit(commands.export(rec, engine, groups.write_folder(args, rec)).to_json(), args.json,
         ["plan", "engine", "fusion", "fp16", "onnx"])
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import engines

    rec = groups.recipe(args)
    engine = groups.engine(args)
    report = engines.optimize_export(groups.export_folder(args, rec, writes=True), engine).to_json()
    if args.json:
        emit(report, True, ["optimize", "lint", "latency_ms", "latency", "speedup", "speedup_ci", "load",
                            "passes_speedup", "passes_speedup_ci"])
        return EXIT_OK
    emit(report, False, ["optimize", "lint"])
    print_bench(report)
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import engines

    rec = groups.recipe(args)
    engine = groups.engine(args)
    emit(engines.build(groups.export_folder(args, rec, writes=True, engine=engine), engine).to_json(), args.json)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from hgdeploy.measure.report import quality_verdict
    from hgdeploy.pipeline import commands

    rec = groups.recipe(args)
    budget = groups.budget(args)
    engine = groups.engine(args, rec)
    folder = groups.export_folder(args, rec, engine=engine)
    report = commands.check(rec, engine, groups.photos(args), folder, budget)
    emit(report.to_json(), args.json, ["weights", "plan", "parity", "fidelity", "quality"])
    if not args.json:
        print(quality_verdict(report.to_json()))
    return parity_exit(report)


def parity_exit(report) -> int:  # noqa: ANN001 - a pipeline Report; cli imports no pipeline module at load time
    """`run` and `check`: exit 0 when parity passed, else 1 with one line on stderr saying which output missed
    which bound."""
    parity = report.parity
    if parity is not None and parity.passed:
        return EXIT_OK
    reason = "; ".join(parity.failures()) if parity is not None else "nothing was compared"
    print(f"hgdeploy: parity failed: {reason}", file=sys.stderr)
    return EXIT_CHECK_FAILED


def cmd_flops(args: argparse.Namespace) -> int:
    from hgdeploy.pipeline import commands

    emit(commands.flops(groups.recipe(args)).to_json(), args.json, ["plan", "gflops"])
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Engines only on an exported folder (no PyTorch needed); with --torch, or without a folder, via the models."""
    from hgdeploy.backends import require_profiler

    from hgdeploy.measure.report import quality

    rec = groups.recipe(args)
    if args.batch is not None:
        return _bench_batches(args, rec)
    budget = groups.budget(args)
    engines_only = args.out is not None and not args.torch
    engine = groups.engine(args) if engines_only else groups.engine(args, rec)
    if args.profile:
        require_profiler(engine)
    folder = groups.export_folder(args, rec, writes=args.profile, engine=engine) if args.out is not None else None
    if engines_only:
        from hgdeploy.pipeline import engines

        report = engines.bench_export(folder, engine, args.profile).to_json()
    else:
        from hgdeploy.pipeline import commands

        report = commands.bench(rec, engine, folder, args.torch, args.profile).to_json()
    report["quality"] = quality(None, budget)  # bench measures no fidelity: its verdict says where to get it
    if args.json:
        emit(report, True, ["plan", "backend", "gflops", "latency_ms", "latency", "speedup", "speedup_ci", "load",
                            "speedup_torch", "speedup_torch_ci", "passes_speedup", "passes_speedup_ci", "profile"])
    else:
        print_bench(report)
        if "profile" in report:
            print_profile(report["profile"])
    return EXIT_OK


def _bench_batches(args: argparse.Namespace, rec: Recipe) -> int:
    """`bench --batch 1,8,32`: throughput per batch size (the models exported at each)."""
    from hgdeploy.core import progress
    from hgdeploy.measure.throughput import parse_batches
    from hgdeploy.pipeline import commands

    try:
        batches = parse_batches(args.batch)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.profile:
        raise UserError("--profile and --batch do not go together: profile one batch (--set model.batch=N --profile)")
    engine = groups.engine(args, rec)
    out = groups.write_folder(args, rec, "bench")
    report = commands.bench_batches(rec, engine, batches, args.torch, out).to_json()
    progress.info(f"wrote {out}/batch.json, batch.png")
    if args.json:
        emit(report, True, ["plan", "backend", "gflops", "batches"])
    else:
        print_batches(report)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from hgdeploy.core import progress
    from hgdeploy.evaluation import run as evaluation

    rec = groups.recipe(args)
    if rec.batch != 1:
        raise UserError(f"eval runs a dataset one image at a time (model.batch = {rec.batch}): drop model.batch, or "
                        "time batches with `hgdeploy bench --batch`")
    out = groups.write_folder(args, rec, evaluation.EVAL_FOLDER)
    data = evaluation.read_dataset(args.dataset, args.layout, args.limit, rec)
    engine = groups.engine(args, rec)
    export = groups.export_folder(args, rec, out=args.export, engine=engine) if args.export is not None else None
    report = evaluation.evaluate(rec, engine, data, export, out, args.save_predictions)
    progress.info(f"wrote {out}/eval.json, eval.md" + (", eval.png" if report.get("figure") else "")
                  + (", predictions/" if args.save_predictions else ""))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_eval(report)
    return EXIT_OK if report["gate"]["passed"] else EXIT_CHECK_FAILED


def cmd_tune(args: argparse.Namespace) -> int:
    from hgdeploy.core import progress
    from hgdeploy.measure.images import load_photos
    from hgdeploy.tune import run as tune
    from hgdeploy.tune.report import TUNE_FILES

    settings = tune.settings(args.budget, args.confidence, args.space, args.time_limit)
    rec = groups.recipe(args)
    tune.check_tunable(rec)
    out = groups.write_folder(args, rec, tune.TUNE_FOLDER)
    held = load_photos(args.holdout) if args.holdout else None
    engine = groups.engine(args, rec)
    ledger = tune.tune(rec, engine, groups.photos(args), dataclasses.replace(settings, holdout=held), out)
    progress.info(f"wrote {out}/" + ", ".join(n for n in TUNE_FILES if (out / n).exists()))
    if args.json:
        print(json.dumps(ledger.to_json(), indent=2))
    else:
        print_tune(ledger)
    best = ledger.best
    if best is None:
        return EXIT_CHECK_FAILED
    return EXIT_OK if (best.holdout or {}).get("within_budget", True) else EXIT_CHECK_FAILED


def cmd_triton(args: argparse.Namespace) -> int:
    """A Triton model repository from an export folder: ONNX files alone, no PyTorch."""
    from hgdeploy.core import progress
    from hgdeploy.pipeline import triton

    rec = groups.recipe(args)
    engine = groups.engine(args, runs_here=False)  # the profile describes the server's machine, not this one
    triton.check_max_batch(args.max_batch)
    repo = groups.triton_repo(args, rec)
    written = triton.write_repository(groups.export_folder(args, rec, engine=engine), engine, repo, rec.name,
                                      args.max_batch)
    progress.info(f"wrote {repo}/: " + ", ".join(m.name for m in written.models) + ", README.md")
    if args.json:
        print(json.dumps(written.to_json(), indent=2))
    else:
        print_triton(written.to_json())
    return EXIT_OK


def cmd_lint(args: argparse.Namespace) -> int:
    from hgdeploy.graph import lint

    major = args.trt_major if args.trt_major is not None else lint.DEFAULT_MAJOR
    runtime = args.runtime
    findings = lint.lint_path(args.model, major) if runtime == "tensorrt" else lint.lint_runtime_path(args.model)
    if args.json:
        print(json.dumps({"model": str(args.model), "runtime": runtime,
                          "trt_major": major if runtime == "tensorrt" else None,
                          "findings": [dataclasses.asdict(f) for f in findings]}, indent=2))
    elif findings:
        print(lint.format_findings(findings))
    else:
        print(f"{args.model}: clean for " + (f"TensorRT {major}'s ONNX parser" if runtime == "tensorrt"
                                             else "ONNX Runtime (every op known, static shapes)"))
    return EXIT_CHECK_FAILED if findings else EXIT_OK


def cmd_families(args: argparse.Namespace) -> int:
    from hgdeploy.core.recipe import bundled_recipes
    from hgdeploy.families.catalogue import families

    recipes = bundled_recipes()
    rows = [{"family": f.name, "summary": f.summary, "options": list(f.options),
             "outputs": {name: kind for name, kind in f.outputs}, "reconstruct_on": list(f.reconstruct_on),
             "recipes": sorted(name for name, fam in recipes.items() if fam == f.name)} for f in families()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_families(rows)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "export": cmd_export, "optimize": cmd_optimize, "lint": cmd_lint, "build": cmd_build,
    "check": cmd_check, "flops": cmd_flops, "bench": cmd_bench, "families": cmd_families, "eval": cmd_eval,
    "tune": cmd_tune, "triton": cmd_triton,
}
