"""How far each engine graph lands from PyTorch fp32, per output, for every bundled recipe: the measurement
the engine profiles' parity bounds come from.

Each recipe is exported at its [ci] shape (and the recipes named with --full at their own size) with
`hgdeploy export --engine ort-cpu-fp16` (it writes the fp32 and the fp16 graphs), then `hgdeploy check` runs
each precision's patched graph on ONNX Runtime's CPU provider against the patched PyTorch model in fp32 on
the bundled photos, under a copy of ort-cpu(-fp16) whose bounds pass everything (so every output is measured,
not just the first failure). Per output it keeps the worst cosine, the largest abs error and the output's
scale (largest |reference|); their ratio is what `parity.max_abs_rel` bounds. Writes
scripts/results/parity_bounds.json and the README block between the parity-bounds markers.

    python scripts/parity_bounds.py                                  # every recipe at its CI shape (~25 min)
    python scripts/parity_bounds.py --full segmenter_vit_l16_ade20k dinov2_s14_focus
    python scripts/parity_bounds.py --only sam_vit_h --full                   # update one recipe's rows
    python scripts/parity_bounds.py --only dinov2_s14_focus --full --check   # CI shape only, print only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import publish, run_child

from hgdeploy import bundled_recipes, exit_code, get_family, load_recipe, to_json, write_atomic

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "scripts" / "results" / "parity_bounds.json"
PARTIAL = RESULTS.with_name("parity_bounds.partial.json")  # rows so far: --resume continues from it
MARGIN = 2.0  # the bundled bounds are this many times the worst measured ratio, as the fp32 bounds were set
# Per precision, kinds bounded by an absolute error of their own (parity.max_abs_per_kind) rather than relative
# to their scale: a heatmap holds probabilities in [0, 1]. In fp16 the largest error of a clustered model's
# tokens and feature maps is not rounding but the few elements whose cluster changes once the layers before the
# clustering round to fp16 (a discrete change: the default model's worst token moves by 2.5 of a scale of 12,
# where the unpatched fp16 graph's worst moves 0.03), so the fp16 max_abs_rel is loose by nature and cosine is
# the gate that bounds the whole output.
BOUNDED_KINDS = {"fp16": ("heatmap",), "fp32": ()}


def recipes() -> list[str]:
    return sorted(bundled_recipes())


def ci_shape(recipe: str) -> list[str]:
    return load_recipe(recipe).ci_overrides


def output_kinds(recipe: str) -> dict[str, str]:
    return dict(get_family(bundled_recipes()[recipe]).outputs)


def permissive_profile(folder: Path, precision: str) -> Path:
    """ort-cpu(-fp16) with bounds that pass any finite output: the measurement, not the gate."""
    path = folder / f"ort-cpu-{precision}-measure.toml"
    path.write_text('[engine]\nbackend = "onnxruntime"\ndevice = "cpu"\nproviders = ["cpu"]\n'
                    f'precision = "{precision}"\n'
                    '[parity]\ncosine_min = 0.0\nmax_abs = 1e30\n')
    return path


def hgdeploy(*args: str) -> dict:
    done = run_child([sys.executable, "-m", "hgdeploy.cli", *args, "--json"], cwd=REPO, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"hgdeploy {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def measure(recipe: str, full: bool, tmp: Path, profiles: dict[str, Path]) -> list[dict]:
    """One export (it writes the fp32 and the fp16 graphs), then a check of each precision's patched graph."""
    sets = [] if full else [a for s in ci_shape(recipe) for a in ("--set", s)]
    out = tmp / f"{recipe}-{'full' if full else 'ci'}"
    try:
        hgdeploy("export", recipe, *sets, "--engine", "ort-cpu-fp16", "--out", str(out))
        return [row(recipe, full, precision,
                    hgdeploy("check", recipe, *sets, "--engine", str(profile), "--out", str(out)))
                for precision, profile in profiles.items()]
    finally:
        shutil.rmtree(out, ignore_errors=True)  # ViT-L/H exports: gigabytes no later step reads


def row(recipe: str, full: bool, precision: str, report: dict) -> dict:
    """One precision's parity report as a table row: per output, its worst cosine, error, scale and kind."""
    kinds = output_kinds(recipe)
    outputs = {name: {k: v[k] for k in ("cosine_min", "max_abs", "scale")}
               | {"ratio": v["max_abs"] / max(v["scale"], 1e-30), "kind": kinds[name]}
               for name, v in report["parity"]["per_output"].items()}
    worst = max(outputs.values(), key=lambda o: o["ratio"])
    size = "full" if full else "ci"
    print(f"{recipe} ({size}, {precision}): worst max_abs/scale {worst['ratio']:.2e}, cosine min "
          f"{min(o['cosine_min'] for o in outputs.values()):.6f}", file=sys.stderr, flush=True)
    return {"recipe": recipe, "size": size, "precision": precision, "input_size": report["plan"].get("input_size"),
            "pretrained": report["weights"]["pretrained"], "outputs": outputs}


def round_up_125(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above x (a bound people can read)."""
    if x <= 0:
        return 0.0
    decade = 10.0 ** math.floor(math.log10(x))
    return next(m * decade for m in (1, 2, 5, 10) if m * decade >= x * (1 - 1e-12))


def suggestions(rows: list[dict]) -> dict:
    """Per precision (fp16: engines/*fp16.toml and ort-trt; fp32: the other profiles)."""
    return {p: suggest([r for r in rows if r["precision"] == p], BOUNDED_KINDS[p])
            for p in dict.fromkeys(r["precision"] for r in rows)}


def suggest(rows: list[dict], bounded: tuple[str, ...]) -> dict:
    """The bounds the measurement supports: max_abs_rel from every output but those of a kind bounded in
    absolute terms (bounded), each of those kinds' max_abs from its worst error; MARGIN times the worst,
    rounded up to 1, 2 or 5 x 10^n."""
    outs = [(o, r["recipe"], name) for r in rows for name, o in r["outputs"].items()]
    rel = max(((o["ratio"], recipe, name) for o, recipe, name in outs if o["kind"] not in bounded),
              default=(0.0, "no output", "of another kind"))
    per_kind = {kind: max((o["max_abs"], recipe, name) for o, recipe, name in outs if o["kind"] == kind)
                for kind in bounded if any(o["kind"] == kind for o, _, _ in outs)}
    return {"max_abs_rel": {"worst": rel, "bound": round_up_125(MARGIN * rel[0])},
            "max_abs_per_kind": {k: {"worst": w, "bound": round_up_125(MARGIN * w[0])} for k, w in per_kind.items()}}


def render(rows: list[dict], versions: dict, failed: list[dict] | None = None) -> str:
    lines = ["| recipe | size | weights | graph | output (kind) | cosine min | max abs | scale (max \\|ref\\|) | "
             "max abs / scale |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for name, o in r["outputs"].items():
            lines.append(f"| {r['recipe']} | {r['size']} | {'trained' if r['pretrained'] else 'random'} | "
                         f"{r['precision']} | {name} ({o['kind']}) | {o['cosine_min']:.6f} | {o['max_abs']:.3g} | "
                         f"{o['scale']:.3g} | {o['ratio']:.2e} |")
    lines.append("")
    for precision, s in suggestions(rows).items():
        mine = [r for r in rows if r["precision"] == precision]
        cos = min((o["cosine_min"], r["recipe"], name) for r in mine for name, o in r["outputs"].items())
        rel = s["max_abs_rel"]
        kinds = "; ".join(f"{kind}: worst max abs {v['worst'][0]:.3g} ({v['worst'][1]}, {v['worst'][2]}) → "
                          f"**max_abs_per_kind.{kind} = {v['bound']:.2g}**"
                          for kind, v in s["max_abs_per_kind"].items())
        lines.append(f"- {precision}: worst cosine {cos[0]:.6f} ({cos[1]}, {cos[2]}); outputs bounded relative to "
                     f"their scale: worst max abs / scale {rel['worst'][0]:.2e} ({rel['worst'][1]}, {rel['worst'][2]})"
                     f" → **max_abs_rel = {rel['bound']:.2g}**" + (f"; {kinds}" if kinds else "") + ".")
    lines += [f"- not measured: {f['recipe']} ({f['size']}): {f['error']}" for f in failed or []]
    lines += [f"\nBounds: {MARGIN:g}× the worst, rounded up to 1, 2 or 5 × 10^n (engines/*.toml [parity]).",
              "", f"Produced by `python scripts/parity_bounds.py` (each patched graph, fp16 and fp32, on ONNX Runtime "
              f"{versions.get('onnxruntime')} CPU against the patched PyTorch model in fp32, torch "
              f"{versions.get('torch')}, the 8 bundled photos, {versions.get('cpu_count')} CPU cores). Random-weight "
              "rows check the graph's numerics, not a trained model's."]
    return "\n".join(lines)


def render_only(path: Path, check: bool) -> int:
    """--render: the README block from a parity_bounds.json, nothing measured."""
    data = json.loads(path.read_text())
    text = render(data["rows"], data["versions"], data.get("failed", []))
    publish(text, "parity-bounds", REPO / "README.md", RESULTS, data | {"suggested": suggestions(data["rows"])}, check)
    return 0


def earlier_rows(resume: bool, update: bool, retried: set[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """The rows and failures a run starts from: an interrupted run's (--resume), the published ones of the
    recipes not measured again (--only), or none."""
    if resume and PARTIAL.exists():
        done = json.loads(PARTIAL.read_text())
    elif update and RESULTS.exists():  # an update: the other recipes' published rows stay
        done = json.loads(RESULTS.read_text())
        done["rows"] = [r for r in done["rows"] if (r["recipe"], r["size"]) not in retried]
    else:
        done = {"rows": [], "failed": []}
    return done["rows"], [f for f in done.get("failed", []) if (f["recipe"], f["size"]) not in retried]


def measure_all(todo: list[tuple[str, bool]], rows: list[dict], failed: list[dict], versions: dict,
                check: bool) -> None:
    """Every (recipe, full) of `todo` not in `rows` yet, appended to rows (or to failed); PARTIAL after each."""
    with tempfile.TemporaryDirectory(prefix="hgdeploy-parity-") as tmp:
        profiles = {p: permissive_profile(Path(tmp), p) for p in ("fp16", "fp32")}
        for recipe, full in todo:
            size = "full" if full else "ci"
            if any(r["recipe"] == recipe and r["size"] == size for r in rows):
                continue
            try:
                rows += measure(recipe, full, Path(tmp), profiles)
            except RuntimeError as exc:  # one recipe's failure is a finding, not the end of the measurement
                failed.append({"recipe": recipe, "size": size, "error": str(exc)})
                print(f"{recipe} ({size}): {exc}", file=sys.stderr, flush=True)
            if not check:
                write_atomic(PARTIAL, to_json({"rows": rows, "failed": failed, "versions": versions}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="recipes at their CI shape (default: every one); their rows replace theirs in the "
                             "published results, the other recipes' rows stay")
    parser.add_argument("--full", nargs="*", default=["dinov2_s14_focus"],
                        help="recipes also measured at their own size (default: the default recipe)")
    parser.add_argument("--check", action="store_true", help="print only; write neither JSON nor README")
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the rows of an interrupted run ({PARTIAL.name}; or copy parity_bounds.json there)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: the README block from a parity_bounds.json")
    args = parser.parse_args()
    if args.render is not None:
        return render_only(args.render, args.check)
    import onnxruntime
    import torch

    versions = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    todo = [(r, True) for r in args.full] + [(r, False) for r in (recipes() if args.only is None else args.only)]
    rows, failed = earlier_rows(args.resume, args.only is not None, {(r, "full" if f else "ci") for r, f in todo})
    measure_all(todo, rows, failed, versions, args.check)
    rows.sort(key=lambda r: (r["size"] != "full", r["recipe"], r["precision"]))  # one order, however measured
    data = {"rows": rows, "failed": failed, "suggested": suggestions(rows), "versions": versions}
    publish(render(rows, versions, failed), "parity-bounds", REPO / "README.md", RESULTS, data, args.check)
    PARTIAL.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "parity_bounds.py"))
