"""What install, the main job and the tests cost on this machine: wall time, peak memory, disk.

From a snapshot of the checkout in a throwaway venv, exactly the README's commands:
`pip install -e ".[dev]"`, `hgdeploy run` (default recipe) and `python -m pytest`, each under
/usr/bin/time -v; disk is what each leaves (the venv, the run folder, pytest's temporary files).
Writes scripts/results/footprint.json (with the slowest tests) and the README block between the footprint
markers.

    python scripts/footprint.py            # about 20 minutes on 2 cores
    python scripts/footprint.py --no-tests # install and run only
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

from common import replace_block, run_sampled
from version_matrix import snapshot

from hgdeploy import exit_code, write_atomic

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "scripts" / "results" / "footprint.json"
README = REPO / "README.md"
SLOWEST = 30  # test phases listed in footprint.json, slowest first (the README keeps the totals)


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Wall seconds, peak memory (GB: the summed RSS of its process tree, sampled every 0.5 s, or /usr/bin/time's
    largest process if higher) and exit code of `cmd`; its output goes to `log`."""
    stats = log.with_suffix(".time")
    start = time.perf_counter()
    with open(log, "w") as fh:
        code, summed = run_sampled(["/usr/bin/time", "-v", "-o", str(stats), *cmd], cwd=cwd, env=env, stdout=fh,
                                   stderr=subprocess.STDOUT)
    text = stats.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024 ** 2
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(max(rss, summed), 2),
            "largest_process_gb": round(rss, 2), "exit": code}


def slowest(log: str) -> list[dict]:
    """pytest's --durations lines (setup, call and teardown of the slowest tests): where CI's minutes go."""
    found = re.findall(r"^([0-9.]+)s (setup|call|teardown) +(.+?) *$", log, flags=re.M)
    return [{"seconds": float(sec), "when": when, "test": test} for sec, when, test in found]


def du(path: Path) -> float:
    """GB on disk under `path`."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()
    return round(int(out[0]) / 1e9, 2) if out else 0.0


def measure(root: Path, tests: bool) -> dict:
    src, venv = snapshot(root / "src"), root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = dict(os.environ, NO_COLOR="1", TMPDIR=str(root / "tmp"))
    (root / "tmp").mkdir()
    out: dict = {"install": timed([py, "-m", "pip", "install", "-q", "-e", ".[dev]"], src, env, root / "install.log")}
    out["install"]["venv_gb"] = du(venv)
    out["run"] = timed([py, "-m", "hgdeploy.cli", "run", "--out", str(root / "runs" / "default")], src, env,
                       root / "run.log")
    out["run"]["output_gb"] = du(root / "runs" / "default")
    report = root / "runs" / "default" / "report.json"
    if report.exists():  # the run's own verdict, measured on this (otherwise quiet) machine
        measured = json.loads(report.read_text())
        out["run"] |= {k: measured.get(k) for k in ("speedup", "speedup_ci", "load")}
    if tests:
        out["tests"] = timed([py, "-m", "pytest", "-p", "no:cacheprovider", f"--durations={SLOWEST}"], src, env,
                             root / "tests.log")
        log = (root / "tests.log").read_text()
        summary = re.findall(r"^=+ (.*(?:passed|failed).*) in [0-9.]+s", log, flags=re.M)
        out["tests"]["summary"] = summary[-1] if summary else "?"
        out["tests"]["failed"] = re.findall(r"^FAILED (\S+)", log, flags=re.M)  # the log goes with the venv
        out["tests"]["slowest"] = slowest(log)
        out["tests"]["tmp_gb"] = du(root / "tmp")
    versions = subprocess.run([py, "-c", "import torch, onnxruntime; print(torch.__version__, onnxruntime.__version__)"],
                              capture_output=True, text=True).stdout.split()
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": versions[0],
                      "onnxruntime": versions[1]}
    return out


def render(r: dict) -> str:
    m, i, run = r["machine"], r["install"], r["run"]
    lines = ["| step (README command) | wall time | peak memory (RSS, all processes) | disk |", "|---|---:|---:|---:|",
             f"| install: `pip install -e \".[dev]\"` into a new venv | {i['seconds'] / 60:.1f} min | "
             f"{i['peak_rss_gb']:.1f} GB | {i['venv_gb']:.1f} GB (the venv) |",
             f"| main job: `hgdeploy run` | {run['seconds'] / 60:.1f} min | {run['peak_rss_gb']:.1f} GB | "
             f"{run['output_gb']:.2f} GB (runs/dinov2_s14_focus) |"]
    if "tests" in r:
        t = r["tests"]
        lines.append(f"| tests: `python -m pytest` ({t['summary']}) | {t['seconds'] / 60:.1f} min | "
                     f"{t['peak_rss_gb']:.1f} GB | {t['tmp_gb']:.1f} GB (temporary files, removed after) |")
    lines += ["", f"Measured by `python scripts/footprint.py` on {m['cpus']} CPU cores, Python {m['python']}, "
              f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, with pip's cache warm (a cold install also "
              "downloads the wheels)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, what in (("--no-tests", "skip the test suite"), ("--no-readme", "do not rewrite README.md")):
        parser.add_argument(flag, action="store_true", help=what)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hgdeploy-footprint-"))
    try:
        result = measure(root, tests=not args.no_tests)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS, json.dumps(result, indent=2) + "\n")
    print(render(result))
    if not args.no_readme:
        write_atomic(README, replace_block(README.read_text(), "footprint", render(result)))
    failed = [k for k in ("install", "run", "tests") if k in result and result[k]["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "footprint.py"))
