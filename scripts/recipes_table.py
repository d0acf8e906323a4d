"""Every bundled recipe at its full published resolution: GFLOPs, and ONNX Runtime parity of the export.

    python scripts/recipes_table.py                 # FLOPs vs published + full-resolution export/parity
    python scripts/recipes_table.py --flops-only    # only the FLOPs tables (seconds)
    python scripts/recipes_table.py --only segmenter_vit_b16_ade20k dpt_large

Writes scripts/results/recipes.json and the README blocks between <!-- recipes:start/end --> and
<!-- published:start/end -->. Without checkpoints the models have random weights (seeded): FLOPs and
parity do not depend on the weights; fidelity would, so it is not reported here.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from common import replace_block

from hgdeploy import (
    INPUT_NAME,
    REPO_ROOT,
    build_models,
    cosine,
    exit_code,
    flops,
    load_profile,
    load_recipe,
    make_runner,
    sample_photos,
    to_batch,
    write_atomic,
    write_deployable,
)

RESULTS = REPO_ROOT / "scripts" / "results" / "recipes.json"
PUBLISHED = REPO_ROOT / "scripts" / "published_gflops.toml"
README = REPO_ROOT / "README.md"


def gflops(recipe: str, overrides: list[str] | None = None) -> dict:
    """`hgdeploy flops` of the recipe: GFLOPs of baseline and patched (and clustering, ratio, and each of the
    family's named parts as "<part>_baseline"/"<part>_patched"), with the plan it counted under "plan"."""
    report = flops(load_recipe(recipe, overrides or [])).to_json()
    return report["gflops"] | {"plan": report["plan"]}


def published_rows() -> list[dict]:
    entries = tomllib.loads(PUBLISHED.read_text())["entry"]
    rows = []
    for e in entries:
        g = gflops(e["recipe"], e.get("set", []))
        which = "baseline" if e.get("baseline") else "patched"
        ours = g[f"{e['part']}_{which}" if "part" in e else which]
        rows.append({"recipe": e["recipe"], "config": e["label"], "published": e["published"], "ours": ours,
                     "diff_pct": 100 * (ours / e["published"] - 1), "within_pct": e["within_pct"]})
        print(f"  {e['recipe']:34s} {e['label']:18s} ours {ours:8.2f}  published {e['published']:8.2f}  "
              f"{rows[-1]['diff_pct']:+.2f} %", file=sys.stderr)
    return rows


def sweep_rows(recipe: str = "segmenter_vit_l16_ade20k", sides: tuple[int, ...] = (8, 12, 16, 20, 24, 28)) -> list[dict]:
    """The paper's cluster-size ablation: the main recipe at every grid from 8x8 to 28x28."""
    rows = []
    for side in sides:
        g = gflops(recipe, [f"cluster.grid={side}x{side}"])
        rows.append({"grid": f"{side}x{side}", "gflops": g["patched"], "clustering": g["clustering"],
                     "baseline": g["baseline"]})
    return rows


WINDOWED = ("mask2former_swin_l_ade20k", "swinv2_l_coco", "sam_vit_h")


def windowed_rows() -> list[dict]:
    """The windowed recipes (Swin, SwinV2, SAM) at their full size: whole-model and part GFLOPs."""
    rows = []
    for recipe in WINDOWED:
        rec = load_recipe(recipe)
        g = gflops(recipe)
        plan = g.pop("plan")
        row = {"recipe": recipe, "input": "x".join(map(str, rec.input_size)),
               "plan": f"windows {plan['token_grid'].split('x')[0]} -> {plan['grid'].split('x')[0]}, blocks "
                       f"{plan['alpha'] + 1}..{plan['reconstruct_after']} of {plan['depth']} clustered",
               **{k: g[k] for k in ("baseline", "patched", "clustering")}}
        row |= {k: v for k, v in g.items() if k.endswith(("_baseline", "_patched"))}
        rows.append(row)
        print(f"  {recipe:28s} {g['baseline']:9.2f} -> {g['patched']:9.2f}", file=sys.stderr)
    return rows


def render_windowed(rows: list[dict]) -> str:
    lines = ["| recipe | input | plan | GFLOPs baseline | GFLOPs patched | ratio | of which clustering + reconstruction "
             "| backbone GFLOPs (baseline -> patched) |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        backbone = (f"{r['backbone_baseline']:.2f} -> {r['backbone_patched']:.2f} "
                    f"({r['backbone_patched'] / r['backbone_baseline']:.3f})" if "backbone_baseline" in r else
                    "the whole model is the backbone")
        lines.append(f"| {r['recipe']} | {r['input']} | {r['plan']} | {r['baseline']:.2f} | {r['patched']:.2f} | "
                     f"{r['patched'] / r['baseline']:.3f} | {r['clustering']:.3f} | {backbone} |")
    return "\n".join(lines)


def parity_row(recipe: str, folder: Path) -> dict:
    """Export baseline and patched at full size (the export road, without the passes); the ONNX Runtime CPU
    profile's runner vs PyTorch on one real photo."""
    rec, profile = load_recipe(recipe), load_profile()
    g = gflops(recipe)
    models = build_models(rec)
    x = to_batch(sample_photos()[:1], models.preprocess)
    row: dict = {"recipe": recipe, "family": rec.family, "input": "x".join(map(str, rec.input_size)),
                 "plan": f"alpha={models.plan.alpha}, {models.plan.grid[0]}x{models.plan.grid[1]}, "
                         f"rebuilt after {models.plan.reconstruct_after}" + (
                             " (logits)" if models.plan.reconstruct_on == "logits" else "")}
    row |= {"gflops_baseline": g["baseline"], "gflops_patched": g["patched"], "gflops_clustering": g["clustering"]}
    names = models.family.output_names
    for key, model in (("baseline", models.baseline), ("patched", models.patched)):
        start = time.perf_counter()
        export, _ = write_deployable(models, x, profile, folder, roles=(key,), passes=False)
        row[f"export_s_{key}"] = time.perf_counter() - start
        with make_runner(export.graphs[key], profile) as runner:
            outputs = runner.infer({INPUT_NAME: x.numpy()})
        got = [outputs[n] for n in names]
        with torch.no_grad():
            want = [t.numpy() for t in model(x)]
        row[f"parity_{key}"] = min(cosine(a, b) for a, b in zip(got, want))
        row[f"max_abs_{key}"] = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(got, want))
        for f in folder.iterdir():
            f.unlink()
    return row


def render_published(rows: list[dict], sweep: list[dict]) -> str:
    lines = ["| recipe | configuration | published GFLOPs | `hgdeploy flops` | difference | tested within |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['config']} | {r['published']:.2f} | {r['ours']:.2f} | {r['diff_pct']:+.2f} % | "
              f"±{r['within_pct']:.1f} % |" for r in rows]
    lines += ["", "Cluster-size sweep, Segmenter ViT-L/16 ADE20K 640×640, α = 10 (baseline "
              f"{sweep[0]['baseline']:.2f} GFLOPs):", "",
              "| grid | GFLOPs | of which clustering + reconstruction |", "|---|---:|---:|"]
    lines += [f"| {r['grid']} | {r['gflops']:.2f} | {r['clustering']:.3f} |" for r in sweep]
    return "\n".join(lines)


def render_recipes(rows: list[dict]) -> str:
    lines = ["| recipe | input | plan | GFLOPs baseline | GFLOPs patched | ratio | ORT parity baseline | ORT parity patched |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['input']} | {r['plan']} | {r['gflops_baseline']:.2f} | {r['gflops_patched']:.2f} "
              f"| {r['gflops_patched'] / r['gflops_baseline']:.3f} | {r['parity_baseline']:.7f} | {r['parity_patched']:.7f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-only", action="store_true", help="only the FLOPs tables (no exports)")
    parser.add_argument("--only", nargs="*", default=None, help="recipes to export (default: every bundled recipe)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    args = parser.parse_args()
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    print("FLOPs against the published tables:", file=sys.stderr)
    results = {"published": published_rows(), "sweep": sweep_rows(), "recipes": previous.get("recipes", [])}
    print("Windowed recipes at full size:", file=sys.stderr)
    results["windowed"] = windowed_rows()
    if not args.flops_only:
        # the windowed recipes' full-size exports (SwinV2-L at 1536, SAM ViT-H at 1024) are too large for a CPU
        # run; their parity is checked at the [ci] shapes by tests/test_families.py
        names = args.only or sorted(p.stem for p in (REPO_ROOT / "export").glob("*.toml") if p.stem not in WINDOWED)
        by_name = {r["recipe"]: r for r in results["recipes"]}
        for name in names:
            print(f"Exporting {name} at full resolution ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="hgdeploy-full-") as tmp:
                by_name[name] = parity_row(name, Path(tmp))
            r = by_name[name]
            print(f"  parity baseline {r['parity_baseline']:.7f} patched {r['parity_patched']:.7f}, GFLOPs "
                  f"{r['gflops_baseline']:.1f} -> {r['gflops_patched']:.1f}", file=sys.stderr, flush=True)
            results["recipes"] = [by_name[k] for k in sorted(by_name)]
            write_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
            gc.collect()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
    print(render_published(results["published"], results["sweep"]))
    print(render_windowed(results["windowed"]))
    if results["recipes"]:
        print(render_recipes(results["recipes"]))
    if not args.no_readme and README.is_file():
        text = replace_block(README.read_text(), "published", render_published(results["published"], results["sweep"]))
        text = replace_block(text, "windowed", render_windowed(results["windowed"]))
        if results["recipes"]:
            text = replace_block(text, "recipes", render_recipes(results["recipes"]))
        write_atomic(README, text)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "recipes_table.py"))
