"""scripts/gpu_report.py, the GPU report, run here as its CPU smoke run: the same steps (export, fp16 parity,
engine timings per setting and form, torch) on ONNX Runtime CPU at the CI shape, so that the script a short GPU
lease depends on has run end to end before it gets there."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_report.py"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def readme_hash() -> str:
    return hashlib.sha256((REPO / "README.md").read_bytes()).hexdigest()


def test_the_smoke_run_measures_every_step_and_renders_them(tmp_path):
    before = readme_hash()
    ran = report("--cpu", "--ci-shapes", "--only", "dinov2_s14_focus", "--plans", "recipe", "--forms", "dense",
                 "--batches", "", "--rounds", "5", "--results", str(tmp_path))
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["smoke"] is True
    steps = data["steps"]
    assert not [s for s in steps if "error" in s or "skipped" in s], steps
    count = {k: sum(s["step"] == k for s in steps) for k in ("export", "parity", "engine", "profile", "torch", "batch")}
    # one form (a second costs the suite 45 s and runs the same steps); on the CPU the eager settings only, fp16
    # fused and fp32 plain (torch: fp16 and fp32); no batch step (--batches ''): it is `hgdeploy bench --batch
    # --torch`, which test_batch.py runs on the tiny model, and its table is rendered below from bench's own rows
    assert count == {"export": 1, "parity": 1, "engine": 2, "profile": 1, "torch": 2, "batch": 0}, count
    export = next(s for s in steps if s["step"] == "export")
    assert export["fusion"]["baseline_fused"]["fused"] == export["fusion"]["baseline_fused"]["found"] > 0
    assert {"baseline_fused_fp16", "baseline_fp16"} <= set(export["fp16"])  # fused and plain twins, one folder
    parts = next(s for s in steps if s["step"] == "profile")["parts_ms"]
    assert parts["patched"]["clustering"] > 0 and parts["baseline"]["attention"] > 0
    assert [s["form"] for s in steps if s["step"] == "parity"] == ["dense"]
    for s in steps:
        if s["step"] in ("engine", "torch"):
            assert s["speedup"] > 0 and all(ms > 0 for ms in s["latency_ms"].values())
    par = next(s for s in steps if s["step"] == "parity")["parity"]
    assert set(par["per_output"]) == {"tokens", "heatmap"} and par["passed"]
    md = (tmp_path / "gpu.md").read_text()
    assert "| dinov2_s14_focus | recipe | dense | fp16 fused, eager |" in md
    assert "| dinov2_s14_focus | ort-cpu-fp16 (eager, profiled) | patched |" in md
    assert "target: dinov2_s14_focus, ort-cpu-fp16 parity cosine ≥ 0.999 on every output" in md
    assert "a smoke run, not a GPU figure" in md
    assert "medians of 5 interleaved runs after one warm-up" in md
    assert all(len(s["latency_ms"]) and s.get("speedup_ci") for s in steps if s["step"] in ("engine", "torch"))
    assert "target: dinov2_s14_focus, fused fp16 engine at batch 32, throughput speed-up ≥ 1.15 on this CPU (a smoke " \
           "run, not a GPU figure): not measured." in md
    assert readme_hash() == before  # a smoke run never writes the README

    rendered = report("--render", str(tmp_path / "gpu.json"), "--results", str(tmp_path / "again"), "--no-readme")
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert (tmp_path / "again" / "gpu.md").read_text() == md


def test_the_batch_table_and_its_target_read_the_rows_bench_batch_makes(tmp_path):
    """The batch step records `bench --batch --torch`'s rows (measure.throughput.batch_row): rendered as the batch
    table, and the batch-32 target read from them (met at 1.25x against 1.15, with the interval)."""
    from hgdeploy.measure.results import Latency
    from hgdeploy.measure.throughput import batch_row
    from hgdeploy.measure.timing import summarize

    def timing(ms: float):
        return summarize([(ms + 0.01 * (i % 3)) / 1e3 for i in range(8)])

    rows = [batch_row(Latency({"baseline": timing(10.0 * b), "patched": timing(8.0 * b),
                               "torch_baseline": timing(12.0 * b), "torch_patched": timing(11.0 * b)}, batch=b))
            for b in (8, 32)]
    data = {"versions": {"cpu_count": 2}, "smoke": True, "steps": [
        {"recipe": "dinov2_s14_focus", "plan": "recipe", "form": "dense", "step": "batch", "profile": "ort-cpu-fp16",
         "batches": rows}]}
    (tmp_path / "gpu.json").write_text(json.dumps(data))
    done = report("--render", str(tmp_path / "gpu.json"), "--results", str(tmp_path), "--no-readme")
    assert done.returncode == 0, done.stderr[-2000:]
    md = (tmp_path / "gpu.md").read_text()
    assert "| dinov2_s14_focus | ort-cpu-fp16 | 32 | 100.0 → 125.0 | 1.25×" in md, md
    assert "| 83.3 → 90.9 | 1.09× |" in md, md  # torch's images/s at batch 32: 1000 * 32 / (12 * 32 ms), / (11 * 32)
    assert "fused fp16 engine at batch 32, throughput speed-up ≥ 1.15 on this CPU (a smoke run, not a GPU figure): " \
           "1.25×" in md and "met." in md


def test_too_few_rounds_for_an_interval_is_refused_in_one_line(tmp_path):
    ran = report("--cpu", "--ci-shapes", "--rounds", "3", "--results", str(tmp_path))
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert "--rounds 3 gives the speed-ups no interval: use at least 5" in ran.stderr
    assert not list(tmp_path.iterdir())


def _engine_step(recipe: str, plan: str, speedup: float, ci: list[float] | None, busy: bool = False) -> dict:
    return {"recipe": recipe, "plan": plan, "form": "dense", "step": "engine", "setting": "fp16 fused, CUDA graph",
            "latency_ms": {"baseline": 10.0, "patched": 10.0 / speedup}, "speedup": speedup, "speedup_ci": ci,
            "load": {"start": 20.0 if busy else 0.5, "end": 20.0 if busy else 0.5, "own_cores": 1.0, "cpus": 16,
                     "busy": busy},
            "gflops": {"baseline": 2.0, "patched": 1.0}}


def test_the_verdict_lines_read_each_best_plans_interval(tmp_path):
    """The per-model verdict by the one rule: "gains" only when the best plan's whole interval clears 1; a median
    above 1 whose interval holds 1 is no measurable change; a busy machine's figure is said to be unreliable."""
    steps = [_engine_step("segmenter_vit_l16_ade20k", "recipe", 1.52, [1.47, 1.58]),
             _engine_step("dinov2_s14_focus", "recipe", 1.04, [0.98, 1.09], busy=True),
             _engine_step("dinov2_s14_focus", "iters 2, neighbourhood", 0.97, [0.95, 0.99])]
    (tmp_path / "gpu.json").write_text(json.dumps({"steps": steps, "versions": {"gpu": "NVIDIA H200", "cpu_count": 16},
                                                   "smoke": True}))
    ran = report("--render", str(tmp_path / "gpu.json"), "--results", str(tmp_path), "--no-readme")
    assert ran.returncode == 0, ran.stderr[-3000:]
    md = (tmp_path / "gpu.md").read_text()
    assert "- segmenter_vit_l16_ade20k gains on this GPU: best 1.52× (95 % CI 1.47–1.58; recipe," in md
    line = next(x for x in md.splitlines() if x.startswith("- dinov2_s14_focus "))
    assert line.startswith("- dinov2_s14_focus shows no measurable change: the best plan's interval holds 1 on this "
                           "GPU: best 1.04× (95 % CI 0.98–1.09; recipe,")
    assert "The figure is unreliable: the machine is busy" in line
    assert "| 1.52× (1.47–1.58) |" in md  # the table's speed-up cells carry their intervals


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this machine has ONNX Runtime's CUDA provider: the refusal is for machines without it")
def test_without_a_cuda_provider_it_stops_in_one_line_before_any_work(tmp_path):
    ran = report("--results", str(tmp_path / "out"), "--no-readme")
    assert ran.returncode == 2
    assert len(ran.stderr.strip().splitlines()) == 1 and "CUDA" in ran.stderr
    assert not (tmp_path / "out").exists()
