"""The supported library range, tested: the oldest declared and the newest torch, transformers and onnxruntime.

Each configuration gets a throwaway venv, `pip install -e ".[dev]"` with the three pinned (oldest: the
floors `pyproject.toml` declares; newest: whatever the registry has), then the export of every
bundled recipe at its CI shape with ONNX Runtime parity and the zero-reduction identity of every
family (tests/test_families.py), and `hgdeploy run` on the default recipe.

    python scripts/version_matrix.py                  # both configurations; README block + scripts/results/versions.json
    python scripts/version_matrix.py --only oldest    # one configuration (the others keep their last result)
    python scripts/version_matrix.py --set transformers==5.17.0 --name transformers-5.17   # any extra pin

Needs the package registry and ~8 GB of disk per venv (torch's CUDA wheels); about 10 minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common import replace_block

from hgdeploy import exit_code, write_atomic

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "scripts" / "results" / "versions.json"
README = REPO / "README.md"
PINNED = ("torch", "transformers", "onnxruntime")
REPORTED = ("torch", "torchvision", "transformers", "onnxruntime", "onnx", "onnxscript", "timm", "numpy")
TESTS = ["tests/test_families.py", "-m", "recipes or not recipes", "-k", "recipe_exports_and_matches or zero_reduction"]


def floors() -> dict[str, str]:
    """package -> the lowest version pyproject.toml declares ("torch>=2.6" -> "2.6")."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep.split(";")[0].split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def configurations(extra: list[str], name: str | None) -> dict[str, list[str]]:
    low = floors()
    configs = {"oldest": [f"{p}=={low[p]}" for p in PINNED], "newest": [f"{p}" for p in PINNED]}
    if extra:
        configs[name or "custom"] = extra
    return configs


def sh(cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 3600) -> int:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode


def snapshot(dest: Path) -> Path:
    """A copy of the checkout as it is now (tracked and untracked, not ignored files): edits made while the
    matrix runs do not leak into it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def tested(venv: Path, src: Path, log: Path) -> dict:
    """Install, run the family tests and the default recipe inside `venv`; what happened, with versions."""
    py = str(venv / "bin" / "python")
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    row: dict = {}
    start = time.perf_counter()
    report = venv / "run.json"
    code = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], log, src, env)
    text = log.read_text()
    summary = re.findall(r"^(\d+ passed.*|.*\d+ failed.*) in [0-9.]+s", text, flags=re.M)
    row["tests"] = summary[-1] if summary else f"pytest exited {code}"
    row["tests_passed"] = code == 0
    out = venv / "run"
    with open(report, "w") as fh:
        done = subprocess.run([py, "-m", "hgdeploy.cli", "run", "--out", str(out), "--json"], cwd=src, stdout=fh,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=3600)
    if done.returncode == 0:
        r = json.loads(report.read_text())
        row["run"] = {"cosine_mean": r["fidelity"]["cosine_mean"], "heatmap_iou": r["fidelity"]["heatmap_iou"],
                      "gflops_baseline": r["gflops"]["baseline"], "gflops_patched": r["gflops"]["patched"],
                      "parity_cosine_min": r["parity"]["cosine_min"], "speedup": r["speedup"]}
    else:
        row["run"] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    # Versions from the installed metadata: an import may fail, which is what this script is here to show.
    probe = ("import importlib.metadata as m, json; v = {}\nfor p in %r:\n    try: v[p] = m.version(p)\n"
             "    except m.PackageNotFoundError: v[p] = None\nprint(json.dumps(v))" % (list(REPORTED),))
    row["versions"] = json.loads(subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env).stdout)
    row["minutes"] = round((time.perf_counter() - start) / 60, 1)
    return row


def one(name: str, pins: list[str], keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"hgdeploy-{name}-"))
    venv, log, src = root / "venv", root / "log.txt", snapshot(root / "src")
    print(f"[{name}] venv {venv}, pins {' '.join(pins)}; log {log}", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        # The machine-wide constraint file caps torch at what lies on this disk; the newest must come from the registry.
        empty = root / "no-constraints.txt"
        empty.write_text("")
        env = dict(os.environ, PIP_CONSTRAINT=str(empty))
        start = time.perf_counter()
        if sh(pip + [*pins, "-e", ".[dev]"], log, src, env) != 0:
            return {"name": name, "pins": pins, "install": "failed", "log_tail": log.read_text()[-1500:]}
        row = {"name": name, "pins": pins, "install_minutes": round((time.perf_counter() - start) / 60, 1)}
        row |= tested(venv, src, log)
        print(f"[{name}] {row['tests']}; run: {row['run']}", file=sys.stderr, flush=True)
        return row
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def render(rows: list[dict]) -> str:
    lines = ["| configuration | torch | transformers | onnxruntime | onnx | onnxscript | family tests | default "
             "recipe: cosine / IoU / GFLOPs / parity |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("versions", {})
        run = r.get("run", {})
        res = (f"{run['cosine_mean']:.4f} / {run['heatmap_iou']:.3f} / {run['gflops_baseline']:.1f} → "
               f"{run['gflops_patched']:.1f} / {run['parity_cosine_min']:.6f}" if "cosine_mean" in run
               else f"failed: {run.get('error', r.get('install', '?'))}")
        lines.append(f"| {r['name']} (`{' '.join(r['pins'])}`) | {v.get('torch', '—')} | {v.get('transformers', '—')} "
                     f"| {v.get('onnxruntime', '—')} | {v.get('onnx', '—')} | {v.get('onnxscript', '—')} "
                     f"| {r.get('tests', r.get('install', '?'))} | {res} |")
    lines += ["", "Produced by `python scripts/version_matrix.py` (throwaway venvs, Python "
              f"{sys.version.split()[0]}, 2 CPU cores): the family tests are `pytest {' '.join(TESTS)}` "
              "(every bundled recipe exported at its CI shape and checked against ONNX Runtime, every family's "
              "zero-reduction identity); the default recipe is `hgdeploy run` at 518×518."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: oldest newest)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="PKG==VER",
                        help="an extra configuration with these pins (repeatable)")
    parser.add_argument("--name", default=None, help="name of the extra configuration")
    parser.add_argument("--keep", action="store_true", help="keep the venvs and logs (printed paths)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    args = parser.parse_args()
    configs = configurations(args.extra, args.name)
    chosen = args.only or ([args.name or "custom"] if args.extra else ["oldest", "newest"])
    previous = {r["name"]: r for r in json.loads(RESULTS.read_text())} if RESULTS.is_file() else {}
    for name in chosen:
        previous[name] = one(name, configs[name], args.keep)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(RESULTS, json.dumps(list(previous.values()), indent=2) + "\n")
    rows = list(previous.values())
    print(render(rows))
    if not args.no_readme:
        write_atomic(README, replace_block(README.read_text(), "versions", render(rows)))
    return 0 if all(r.get("tests_passed") and "cosine_mean" in r.get("run", {}) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(exit_code(main, "version_matrix.py"))
