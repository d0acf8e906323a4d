"""Memory: each step's measured peak, the estimate made before the heavy work and the refusal of a command that
cannot fit, the activation count it rests on, and ONNX Runtime's lean sessions for large graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hgdeploy.backends import onnxrt
from hgdeploy.core.errors import UserError
from hgdeploy.core.memory import GB, MEMORY_ENV, Need, StepPeaks, estimate_steps, machine_memory_gb, smaller_setting
from hgdeploy.measure.activations import activation_bytes

from conftest import TINY_TIMM


def test_a_command_that_cannot_fit_is_refused_in_one_line_before_the_heavy_work(tmp_path):
    out = tmp_path / "export"
    env = dict(os.environ, **{MEMORY_ENV: "0.5"})
    ran = subprocess.run([sys.executable, "-m", "hgdeploy.cli", "export", *TINY_TIMM, "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 2, ran.stderr[-2000:]
    errors = [line for line in ran.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "needs about" in errors[0] and f"${MEMORY_ENV} is 0.5 GB" in errors[0], ran.stderr
    assert "Exporting" not in ran.stderr and not out.exists(), "the refusal must come before any export"


def test_an_export_reports_its_estimate_and_each_steps_measured_peak(small_export):
    memory = json.loads((small_export.parent / "export.json").read_text())["memory"]
    steps = {s["step"].split(" ")[0]: s for s in memory["steps"]}
    assert {"Loading", "Exporting", "Optimizing"} <= set(steps), memory
    assert all(0.1 < s["peak_gb"] <= memory["peak_gb"] + 1e-6 for s in memory["steps"]), memory
    # the estimate holds what was measured, without being absurdly above it
    assert memory["peak_gb"] <= memory["estimate_gb"] <= 3 * memory["peak_gb"], memory
    recorded = json.loads((small_export / "manifest.json").read_text())
    assert memory["weights_gb"] > 0.05 and recorded


def test_a_step_peak_sees_what_the_step_allocated():
    peaks = StepPeaks()
    peaks.begin("quiet")
    quiet = peaks.end()
    peaks.begin("allocates")
    block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    block += 1
    del block
    loud = peaks.end()
    assert loud.peak_gb - quiet.peak_gb > 0.3, (quiet, loud)


def test_activations_are_the_peak_of_live_tensors_of_one_forward():
    model = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 10))
    hidden, small = 4 * 1000 * 4, 4 * 10 * 4  # bytes of the [4, 1000] fp32 results and of the [4, 10] input/output
    counted = activation_bytes(model, torch.zeros(4, 10))
    assert 2 * hidden <= counted <= 2 * hidden + 2 * small  # the hidden tensor and its ReLU are alive together
    inplace = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(inplace=True), nn.Linear(1000, 10))
    assert activation_bytes(inplace, torch.zeros(4, 10)) <= hidden + 2 * small  # in place: no second copy
    assert activation_bytes(nn.Sequential(model, model[:2]), torch.zeros(4, 10)) >= counted


def test_the_estimate_grows_with_weights_activations_and_sessions():
    small, big = Need(GB // 10, GB // 10), Need(GB, GB)
    steps = ("export", "passes", "check", "latency")
    a, b = estimate_steps(small, steps), estimate_steps(big, steps)
    assert all(b[s] > a[s] for s in steps)
    assert estimate_steps(big, ("latency",), sessions=3)["latency"] > estimate_steps(big, ("latency",))["latency"]
    assert estimate_steps(big, ("latency",), lean=True)["latency"] < estimate_steps(big, ("latency",))["latency"]


def test_the_smaller_input_suggested_fits_and_weights_that_cannot_fit_ask_for_a_machine():
    need, steps, have = Need(GB // 2, 8 * GB), ("export", "check", "latency"), 10.0
    assert max(estimate_steps(need, steps).values()) > have
    text = smaller_setting(need, steps, 2, True, False, (1024, 1024), have)
    h, w = (int(v) for v in text.split("model.input_size=")[1].rstrip(")").split("x"))
    assert h < 1024 and h % 32 == 0 and h == w
    scaled = Need(need.weights, int(need.activations * h * w / 1024**2))  # activations grow with the pixels at most
    assert max(estimate_steps(scaled, steps).values()) <= have
    assert "machine with more memory" in smaller_setting(Need(20 * GB, GB), steps, 2, True, False, (512, 512), have)


def test_the_memory_limit_comes_from_the_environment_and_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "3.5")
    assert machine_memory_gb() == (3.5, f"${MEMORY_ENV}")
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(UserError, match="not a number of GB"):
        machine_memory_gb()
    monkeypatch.delenv(MEMORY_ENV)
    assert 0.5 < machine_memory_gb()[0] < 1 << 16


def test_a_lean_session_computes_what_a_full_one_does(monkeypatch, small_export):
    """Large graphs run without ORT's constant folding and arena: the same outputs (the tiny export stands in for a
    large graph with the threshold at 0)."""
    path = small_export / "patched.opt.onnx"
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
            .astype(np.float32) for i in full.get_inputs()}
    monkeypatch.setattr(onnxrt, "LEAN_GRAPH_BYTES", 0)
    assert onnxrt.lean_session(path, [("CPUExecutionProvider", {})])
    assert not onnxrt.lean_session(path, [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})])
    from hgdeploy.backends import load_profile

    with onnxrt.runner(path, load_profile()) as lean:
        got = lean.infer(feed)
    for name, want in zip([o.name for o in full.get_outputs()], full.run(None, feed)):
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)


def test_an_export_keeps_no_weight_of_the_model_alive(tmp_path):
    """onnxscript's rewrite rules keep the graph of their last match: without forget_rewriter_matches every weight
    of an exported model outlived it (SAM ViT-H: 2.4 GB through `run`'s timing step)."""
    import gc
    import weakref

    from hgdeploy.patch.export import export_onnx

    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 8))
    weight = weakref.ref(model[0].weight)
    export_onnx(model, torch.zeros(2, 64), tmp_path / "m.onnx", ("y",))
    del model
    gc.collect()
    assert weight() is None, "the exported model's weights are still referenced after the export"


FREEZE = """
import gc, weakref
from hgdeploy.core.memory import freeze_imports

class Node:  # a cycle, as a transformers or timm model is one
    pass

before = Node(); before.me = before; old = weakref.ref(before); del before
freeze_imports()
frozen = gc.get_freeze_count()
after = Node(); after.me = after; new = weakref.ref(after); del after
gc.collect()
freeze_imports()  # frozen already: nothing more is frozen
print(frozen > 0, old() is None, new() is None, gc.get_freeze_count() == frozen)
"""


def test_freezing_the_imports_collects_the_garbage_first_and_leaves_later_cycles_collectable():
    """freeze_imports (before a model is built) hides what the process holds from later collections; a cycle made
    before it is collected first, not frozen with it, one made after it is collected as ever, and a second call
    freezes nothing more. A fresh process: the test session froze its own objects after collecting."""
    child = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120, check=True)
    assert child.stdout.split() == ["True", "True", "True", "True"], child.stdout


def test_a_command_started_by_a_big_process_reports_its_own_peak():
    """getrusage's maxrss survives exec on Linux: a command started by a 600 MB process said its peak was 600 MB
    (a pytest worker's 2.6 GB showed up as the export's peak). The peak is the program's own high-water mark."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc: the peak is getrusage's there")
    block = np.ones(600 * 2**20 // 8)  # 600 MB, touched
    code = "from hgdeploy.core.memory import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert float(child.stdout) < 400, f"the child reported {child.stdout.strip()} MB beside a {block.nbytes >> 20} MB parent"


def test_a_big_models_run_exports_and_checks_in_processes_of_their_own_with_the_same_results(
        tmp_path, monkeypatch, tiny_export):
    """Above FRESH_PROCESS_BYTES `run` exports and checks in fresh processes (an export's leftover heap would
    come on top of every later step): the report names both processes with their peaks, the command's peak
    counts what this process held meanwhile, and the graphs are those `hgdeploy export` writes in one process
    (the children load the same seeded weights), which pass parity against the check child's PyTorch model."""
    import onnx

    from hgdeploy.backends import load_profile
    from hgdeploy.core.process import CHILD_PEAKS
    from hgdeploy.core.recipe import load_recipe
    from hgdeploy.measure.images import sample_photos
    from hgdeploy.pipeline import commands

    CHILD_PEAKS.clear()
    monkeypatch.setattr(commands, "FRESH_PROCESS_BYTES", 0)
    recipe = load_recipe(TINY_TIMM[0], TINY_TIMM[2::2])
    report = commands.run(recipe, load_profile(), sample_photos()[:2], tmp_path / "out").to_json()
    CHILD_PEAKS.clear()
    processes = report["memory"]["processes"]
    assert [p["step"] for p in processes] == ["export", "passes", "check"], processes
    assert all(0 < p["peak_gb"] < p["with_the_command_gb"] <= report["memory"]["peak_gb"] for p in processes)
    steps = [s["step"] for s in report["memory"]["steps"]]
    assert any(s.startswith("Exporting patched.onnx") for s in steps) and any(s.startswith("Running 2 images") for s in steps)
    assert any(s.startswith("Fusing attention: patched.opt.onnx") for s in steps)
    for name in ("baseline.onnx", "patched.opt.onnx", "patched.fused.onnx"):
        a, b = (onnx.load(str(folder / name)) for folder in (tmp_path / "out", tiny_export))
        assert [(t.name, t.raw_data) for t in a.graph.initializer] == [(t.name, t.raw_data) for t in b.graph.initializer]
    assert report["parity"]["passed"] and report["parity"]["cosine_min"] >= 0.9999
    assert report["fidelity"]["images"] == 2 and report["gflops"]["patched"] < report["gflops"]["baseline"]
    assert set(report["latency_ms"]) == {"baseline", "patched"}


def test_a_step_in_its_own_process_raises_its_error_here_and_a_killed_one_is_named():
    from hgdeploy.core.process import CHILD_PEAKS, in_fresh_process

    with pytest.raises(UserError, match="no such recipe"):
        in_fresh_process("export", _fails_as_a_user_error)
    with pytest.raises(RuntimeError, match="the check step's process ended without a result: killed"):
        in_fresh_process("check", _killed)
    assert in_fresh_process("flops", divmod, 7, 2) == (3, 1)
    assert [c.step for c in CHILD_PEAKS[-2:]] == ["export", "flops"]
    CHILD_PEAKS.clear()


def _fails_as_a_user_error() -> None:
    raise UserError("no such recipe: it is only a test")


def _killed() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
