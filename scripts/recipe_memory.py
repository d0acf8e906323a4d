"""What each bundled recipe's commands need on this machine: peak resident memory and wall time of `hgdeploy run`
at the recipe's [ci] shape and of `hgdeploy export` at its real size, each under /usr/bin/time -v, beside the
estimate hgdeploy made before the heavy work (report.json's memory section).

A command whose estimate exceeds the machine's memory is refused by hgdeploy in one line (exit 2) before any
heavy work; the table says so, with the estimate. Writes scripts/results/recipe_memory.json (merged: a rerun of
some recipes or modes keeps the others' rows) and the README block between the recipe-memory markers.

    python scripts/recipe_memory.py                      # every recipe, both modes (hours on 2 cores)
    python scripts/recipe_memory.py --modes ci           # the [ci] runs only (about 40 minutes)
    python scripts/recipe_memory.py --recipes sam_vit_h swinv2_l_coco --modes real
    python scripts/recipe_memory.py --modes ci --quick   # fewer timed runs: the same peaks, sooner
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish, run_sampled

from hgdeploy import exit_code, load_recipe, machine_memory_gb

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "scripts" / "results" / "recipe_memory.json"
README = REPO / "README.md"
MODES = ("ci", "real")
LIMIT_S = 3600  # one command's wall-clock limit


QUICK = (1, 3)  # --quick: warm-up and timed runs of each engine (the default profile has 3 and 15)


def quick_profile(root: Path) -> Path:
    """The default engine profile with QUICK timing: the same sessions at once, so the same peak, in less time."""
    text = (REPO / "engines" / "ort-cpu.toml").read_text()
    text = re.sub(r"^warmup = \d+", f"warmup = {QUICK[0]}", text, flags=re.M)
    text = re.sub(r"^runs = \d+", f"runs = {QUICK[1]}", text, flags=re.M)
    path = root / "ort-cpu-quick.toml"
    path.write_text(text)
    return path


def measure(recipe: str, mode: str, root: Path, engine: Path | None = None) -> dict:
    """One command under /usr/bin/time -v: `run` at the [ci] shape, `export` at the recipe's own size."""
    rec = load_recipe(recipe)
    sets = [a for s in rec.ci_overrides for a in ("--set", s)] if mode == "ci" else []
    if engine is not None and mode == "ci":
        sets += ["--engine", str(engine)]
    command = "run" if mode == "ci" else "export"
    out = root / f"{recipe}-{mode}"
    stats, log = root / "time.txt", root / f"{recipe}-{mode}.log"
    cmd = ["/usr/bin/time", "-v", "-o", str(stats), "timeout", "-s", "INT", str(LIMIT_S), sys.executable, "-m",
           "hgdeploy.cli", command, recipe, *sets, "--out", str(out), "--json"]
    start = time.perf_counter()
    with open(log, "w") as fh:
        code, summed = run_sampled(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, NO_COLOR="1"))
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats.read_text())
    largest = int(rss.group(1)) / 2**20 if rss else 0.0
    row = {"recipe": recipe, "mode": mode, "command": f"hgdeploy {command} {recipe} {' '.join(sets)}".strip(),
           "input_size": "x".join(map(str, load_recipe(recipe, rec.ci_overrides if mode == "ci" else []).input_size)),
           "exit": code, "seconds": round(time.perf_counter() - start, 1),
           "peak_gb": round(max(largest, summed), 2), "largest_process_gb": round(largest, 2)}
    estimate = re.search(r"needs about ([0-9.]+) GB", text)
    row["estimate_gb"] = float(estimate.group(1)) if estimate else None
    refused = re.search(r"hgdeploy: error: (.*)", text)
    if refused:
        row["error"] = refused.group(1).strip()
    report = out / "report.json"
    if report.is_file():
        row["steps"] = json.loads(report.read_text()).get("memory", {}).get("steps", [])
    shutil.rmtree(out, ignore_errors=True)
    return row


def render(rows: list[dict], machine: dict) -> str:
    lines = ["| recipe | command | input | estimate | measured peak | wall time | result |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["recipe"])):
        result = "ok" if r["exit"] == 0 else ("refused up front (exit 2)" if r.get("error") and r["exit"] == 2
                                              else f"exit {r['exit']}")
        est = f"{r['estimate_gb']:.1f} GB" if r.get("estimate_gb") else "—"
        mark = "*" if r.get("quick") and r["mode"] == "ci" else ""
        lines.append(f"| {r['recipe']}{mark} | {'run' if r['mode'] == 'ci' else 'export'} ({r['mode']}) | {r['input_size']} "
                     f"| {est} | {r['peak_gb']:.1f} GB | {r['seconds'] / 60:.1f} min | {result} |")
    lines += ["", f"Measured by `python scripts/recipe_memory.py` on {machine['cpus']} CPU cores with "
              f"{machine['memory_gb']:.0f} GB of memory, Python {machine['python']}; peak = the summed resident memory of "
              "the command's processes (sampled every 0.5 s) or /usr/bin/time's largest process if higher; estimate = what hgdeploy said before the heavy work (a command whose estimate "
              "exceeds the machine's memory is refused with it)."]
    if any(r.get("quick") for r in rows):
        lines.append(f"Rows marked * timed each engine {QUICK[0]}+{QUICK[1]} runs (`--quick`) instead of the default "
                     "profile's 3+15: the same sessions are held at once, so the same peak, but a shorter wall time "
                     "than a default `run`.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=sorted(p.stem for p in (REPO / "export").glob("*.toml")))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-readme", action="store_true", help="print the table, write nothing")
    parser.add_argument("--quick", action="store_true",
                        help=f"time each engine {QUICK[0]}+{QUICK[1]} runs instead of the profile's 3+15 (the same "
                             "peak: the sessions held at once do not change)")
    args = parser.parse_args()
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    rows = {(r["recipe"], r["mode"]): r for r in old["rows"]}
    root = Path(tempfile.mkdtemp(prefix="hgdeploy-recipe-memory-"))
    engine = quick_profile(root) if args.quick else None
    try:
        for mode in args.modes:
            for recipe in args.recipes:
                row = measure(recipe, mode, root, engine) | {"quick": args.quick}
                print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
                rows[(recipe, mode)] = row
                if not args.no_readme:  # each row kept as it comes: a long sweep stopped halfway keeps its rows
                    data = {"machine": machine(), "rows": list(rows.values())}
                    publish(render(data["rows"], data["machine"]), "recipe-memory", README, RESULTS, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gb": machine_memory_gb()[0], "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(exit_code(main, "recipe_memory.py"))
