"""The command line as a user meets it: bad input fails cleanly, the pipeline writes its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SMALL_EXPORT, TINY_TIMM, hgdeploy_cli, hgdeploy_main

from hgdeploy.cli import main
from hgdeploy.measure.report import speed_verdict

REPO = Path(__file__).resolve().parents[1]
SMALL = [a for s in SMALL_EXPORT for a in ("--set", s)]
REPORT_KEYS = ["recipe", "backend", "plan", "parity", "fidelity", "gflops", "latency_ms", "speedup"]


hgdeploy = hgdeploy_cli


def _bad_recipe(tmp_path: Path) -> str:
    text = (REPO / "export" / "dinov2_s14_focus.toml").read_text().replace("iters =", "itres =")
    path = tmp_path / "typo.toml"
    path.write_text(text)
    return str(path)


def _bad_space(tmp_path: Path) -> str:
    path = tmp_path / "space.toml"
    path.write_text("[space]\nalpha = [0]\n")
    return str(path)


def _only_notes(tmp_path: Path) -> Path:
    folder = tmp_path / "notes_only"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("not a photo")
    return folder


BAD_INPUTS = {
    "missing image folder": (lambda tmp, photos: ["run", "--images", str(tmp / "nope")], "does not exist"),
    "no photo, only other files": (lambda tmp, photos: ["run", "--images", str(_only_notes(tmp))],
                                   "holds no jpg/png photos (only notes.txt)"),
    "alpha out of range": (lambda tmp, photos: ["run", "--set", "cluster.alpha=40"], "cluster.alpha"),
    "grid too large": (lambda tmp, photos: ["run", "--set", "cluster.grid=99x99"], "larger than the token grid"),
    "tau not positive": (lambda tmp, photos: ["run", "--set", "cluster.tau=0"], "cluster.tau"),
    "even neighbourhood": (lambda tmp, photos: ["run", "--set", "cluster.neighbours=4"], "odd"),
    "misspelled recipe key": (lambda tmp, photos: ["run", _bad_recipe(tmp)], "did you mean cluster.iters"),
    "misspelled --set key": (lambda tmp, photos: ["run", "--set", "clutser.tau=1"], "did you mean [cluster]"),
    "missing recipe file": (lambda tmp, photos: ["run", str(tmp / "missing.toml")], "not found"),
    "misspelled recipe name": (lambda tmp, photos: ["run", "segmenter_vit_l16_ade2k"],
                               "not found; did you mean segmenter_vit_l16_ade20k?"),
    "misspelled engine profile": (lambda tmp, photos: ["run", "--engine", "ort-cuda-fp61"],
                                  "did you mean ort-cuda-fp16?"),
    "missing engine profile": (lambda tmp, photos: ["run", "--engine", "trt-nope"], "engine profile"),
    "tune budget the shell cut": (lambda tmp, photos: ["tune", "--budget", "cosine"], "quote it"),
    "tune budget of no metric": (lambda tmp, photos: ["tune", *TINY_TIMM, "--budget", "miou>=0.9"],
                                 "has no metric 'miou'"),
    "tune bad space": (lambda tmp, photos: ["tune", "--budget", "cosine>=0.9", "--space", _bad_space(tmp)],
                       "must be a positive whole number"),
    "tune holdout of no photos": (lambda tmp, photos: ["tune", "--budget", "cosine>=0.9", "--holdout",
                                                       str(_only_notes(tmp))], "holds no jpg/png photos"),
    "tune of a window family": (lambda tmp, photos: ["tune", "sam_vit_h", "--budget", "cosine>=0.9"],
                                "does not sweep family sam"),
    "unknown option": (lambda tmp, photos: ["families", "--bogus"], "error: unrecognized arguments: --bogus"),
    "option without its value": (lambda tmp, photos: ["run", "--engine"], "error: run: argument --engine"),
    "window grid not square": (lambda tmp, photos: ["export", "mask2former_swin_l_ade20k", "--set",
                                                    "model.input_size=320x320", "--set", "cluster.grid=8x6"],
                               "must be square"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, two_photos, capsys):
    """In process (cli.main, what the console script calls): the same exit code and stderr, without paying
    a new interpreter and torch import per case."""
    photos = tmp_path / "photos"
    shutil.copytree(two_photos, photos)
    (photos / "notes.txt").write_text("not a photo")
    make_args, needle = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = main([*make_args(tmp_path, photos), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("✓")]
    assert len(lines) == 1 and lines[0].startswith("hgdeploy: error:"), stderr
    assert needle in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_every_command_has_help():
    for command in ("run", "export", "optimize", "build", "check", "flops", "bench", "eval", "tune"):
        result = hgdeploy_main(command, "--help")
        assert result.returncode == 0 and "--set" in result.stdout


def test_flops_prints_its_keys():
    result = hgdeploy_main("flops", *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    g = json.loads(result.stdout)["gflops"]
    assert set(g) >= {"baseline", "patched", "clustering"} and 0 < g["clustering"] < g["patched"] < g["baseline"]


def test_bench_times_torch_and_engine_interleaved(tmp_path):
    """Without --out bench exports (to a temporary folder) and runs the passes first: the tiny model keeps it quick."""
    profile = tmp_path / "quick.toml"
    profile.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 3\n')
    result = hgdeploy_main("bench", *TINY_TIMM, "--engine", str(profile), "--torch", "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert set(r["latency_ms"]) == {"baseline", "patched", "patched_unoptimized", "torch_baseline", "torch_patched"}
    for name, v in r["latency"].items():
        assert v["runs"] == 3 and 0 < v["min_ms"] <= v["median_ms"] <= v["p90_ms"], name
        assert r["latency_ms"][name] == v["median_ms"]
    ms = r["latency_ms"]
    assert r["speedup"] == pytest.approx(ms["baseline"] / ms["patched"])  # baseline over patched, of the engine
    assert r["speedup_torch"] == pytest.approx(ms["torch_baseline"] / ms["torch_patched"])  # and of torch eager
    assert r["gflops"]["patched"] < r["gflops"]["baseline"]


def test_check_without_export_says_what_to_do(tmp_path):
    result = hgdeploy_main("check", *SMALL, "--out", str(tmp_path / "empty"))
    assert result.returncode == 2 and "run `hgdeploy export`" in result.stderr


@pytest.mark.slow
def test_default_run_meets_the_acceptance_figures_and_build_and_lint_take_its_folder(tmp_path):
    """`hgdeploy run` with no arguments but fewer timed rounds: real model, real photos, the figures the README
    promises, the files and report it writes; then the deploy-side commands on that folder (build, lint). One run
    serves both: the default run is the suite's costliest step. The default profile's 3+15 timed runs are
    scripts/footprint.py's to measure; 1+5 give the speed-up its interval here."""
    from hgdeploy.measure.images import sample_photos

    out = tmp_path / "default"
    quick = tmp_path / "quick.toml"
    quick.write_text((REPO / "engines" / "ort-cpu.toml").read_text().replace("warmup = 3", "warmup = 1")
                     .replace("runs = 15", "runs = 5"))
    result = hgdeploy("run", "--engine", str(quick), "--out", str(out))
    assert result.returncode == 0, result.stderr
    # The summary is a result: on stdout. Nothing but our own progress on stderr (no library warnings such
    # as ONNX Runtime's "[W:onnxruntime:...] UnsqueezeElimination cannot remove node").
    assert "## Summary" in result.stdout and "parity passed" in result.stdout and "## Summary" not in result.stderr
    noise = [line for line in result.stderr.splitlines() if not line.startswith(("✓", "wrote ", "memory: "))]
    assert noise == [], noise
    r = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in r
    assert r["recipe"]["name"] == "dinov2_s14_focus" and r["plan"]["grid"] == "28x28"
    assert r["fidelity"]["cosine_mean"] >= 0.985
    assert r["fidelity"]["heatmap_iou"] >= 0.92
    assert r["fidelity"]["images"] == len(sample_photos())
    assert r["gflops"]["patched"] <= 0.8 * r["gflops"]["baseline"]
    assert {"cosine_min", "max_abs", "passed"} <= set(r["parity"])
    assert r["parity"]["passed"] and r["parity"]["cosine_min"] >= 0.9999
    assert r["speedup"] > 1.0  # the 1.15 target is measured by scripts/; CI machines are shared and noisy
    assert r["speedup"] == pytest.approx(r["latency_ms"]["baseline"] / r["latency_ms"]["patched"])
    assert {"baseline", "patched"} == set(r["latency_ms"])
    assert speed_verdict(r) in (out / "report.md").read_text()  # the verdict leads the summary
    for name in ("baseline.onnx", "patched.onnx", "patched.opt.onnx", "baseline.fused.onnx", "patched.fused.onnx",
                 "report.json", "report.md"):
        assert (out / name).is_file()
    # ort-cpu runs the fused twins (one MultiHeadAttention per attention block), the patched one from the passes
    assert r["parity"]["engine_model"] == "patched.fused.onnx" and r["parity"]["reference_device"] == "cpu"
    assert r["fusion"]["patched_fused"]["fused"] == r["fusion"]["patched_fused"]["found"] > 0
    assert r["optimize"]["gflops"]["after"]["total"] <= r["optimize"]["gflops"]["before"]["total"]
    assert r["lint"]["clean"], r["lint"]["findings"]
    linted = hgdeploy_main("lint", str(out / "patched.opt.onnx"))
    assert linted.returncode == 0 and "clean" in linted.stdout

    assert r["latency"]["baseline"]["runs"] == 5 and r["speedup_ci"] is not None
    assert r["weights"]["pretrained"] is True and "structure_check_only" not in r["fidelity"]
    built = hgdeploy_main("build", "--engine", str(quick), "--out", str(out), "--json")
    assert built.returncode == 0, built.stderr
    assert (out / "engine.quick.json").is_file()
    # `check --images` on the user's photos with these real weights: test_batch.py's check of two photos


CPU = {"name": "ort-cpu", "device": "cpu", "versions": {}, "machine": {"cpu_count": 2}}
GPU = {"name": "ort-cuda-fp16", "device": "gpu", "versions": {"gpu": "NVIDIA H200"}, "machine": {"cpu_count": 16}}
# Interleaved rounds (ms) of a patched graph about 12 % faster than its baseline, with round-to-round drift that
# both runners share and a little noise of their own.
BASE_MS = [10.0, 10.4, 9.8, 11.9, 10.1, 10.2, 12.5, 9.9, 10.3, 10.0, 10.6, 9.7, 11.0, 10.2, 10.1]
PATCHED_MS = [8.9, 9.4, 8.6, 10.5, 9.2, 9.0, 11.4, 8.8, 9.1, 9.0, 9.3, 8.7, 9.9, 9.1, 9.0]


def test_the_speedup_interval_is_a_seeded_bootstrap_of_the_per_round_ratios():
    import numpy as np

    from hgdeploy.measure.timing import CI_RESAMPLES, MIN_ROUNDS, speedup_interval

    ratios = np.array(BASE_MS) / np.array(PATCHED_MS)
    rng = np.random.default_rng(0)  # the direct computation: resample the rounds' ratios, take each median
    picks = rng.integers(0, len(ratios), size=(CI_RESAMPLES, len(ratios)))
    medians = sorted(float(np.median([ratios[i] for i in row])) for row in picks)
    expected = (float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975)))
    low, high = speedup_interval(BASE_MS, PATCHED_MS)
    assert (low, high) == pytest.approx(expected, abs=1e-12)
    assert ratios.min() <= low <= np.median(ratios) <= high <= ratios.max() and low > 1.0
    assert speedup_interval(BASE_MS, PATCHED_MS) == (low, high)  # seeded: the same rounds, the same interval
    assert speedup_interval([12.0] * 9, [10.0] * 9) == pytest.approx((1.2, 1.2))  # every round agrees
    assert speedup_interval(BASE_MS[:MIN_ROUNDS - 1], PATCHED_MS[:MIN_ROUNDS - 1]) is None  # too few rounds

    from hgdeploy.measure.results import Latency
    from hgdeploy.measure.timing import summarize

    latency = Latency({"baseline": summarize([x / 1e3 for x in BASE_MS]),
                       "patched": summarize([x / 1e3 for x in PATCHED_MS])})
    doc = latency.to_json()
    assert doc["speedup_ci"] == pytest.approx([low, high]) and doc["latency"]["baseline"]["rounds_ms"] == \
        pytest.approx(BASE_MS)


@pytest.mark.parametrize("ci, opening", [
    ([1.04, 1.21], "Faster here: the patched engine runs 1.12x the baseline's speed (95 % CI 1.04–1.21;"),
    ([0.97, 1.19], "No measurable change here: 1.12x, and its 95 % CI 0.97–1.19 holds 1"),
    ([0.81, 0.93], "No gain here: the patched engine is slower than the baseline, 0.88x (95 % CI 0.81–0.93;"),
    (None, "Too few timing rounds to tell: 1.12x by the medians of 3 interleaved rounds"),
])
def test_the_speed_verdict_reads_the_interval_not_the_median(ci, opening):
    speedup = 0.88 if ci and ci[1] < 1 else 1.12
    report = {"speedup": speedup, "speedup_ci": ci, "backend": CPU, "latency": {"baseline": {"runs": 3}}}
    verdict = speed_verdict(report)
    assert verdict.startswith(opening), verdict
    assert "ort-cpu on this CPU, 2 cores" in verdict and "unreliable" not in verdict
    gpu = speed_verdict(report | {"backend": GPU})
    assert "ort-cuda-fp16 on NVIDIA H200" in gpu
    assert speed_verdict({"plan": {}}) is None  # nothing timed, nothing said


def _fake_runner(ms: float):
    class Runner:  # what time_interleaved needs of a Polygraphy runner
        name = f"fake{ms}"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, feed, check_inputs=False):
            return {}

        def last_inference_time(self):
            return ms / 1e3

    return Runner()


@pytest.mark.parametrize("load, busy", [(7.5, True), (0.2, False)])
def test_a_busy_machine_makes_the_verdict_warn_that_the_figure_is_unreliable(monkeypatch, load, busy):
    import os

    import numpy as np

    from hgdeploy.measure.results import Latency
    from hgdeploy.measure.timing import time_interleaved

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))  # the machine probe, not the code under test
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    timed = time_interleaved({"baseline": _fake_runner(12.0), "patched": _fake_runner(10.0)},
                             {"x": np.zeros(1, np.float32)}, warmup=1, runs=8)
    report = Latency(dict(timed), load=timed.load).to_json() | {"backend": CPU}
    assert report["load"]["start"] == report["load"]["end"] == load and report["load"]["cpus"] == 2
    assert report["load"]["busy"] is busy and report["speedup_ci"] == pytest.approx([1.2, 1.2])
    verdict = speed_verdict(report)
    assert verdict.startswith("Faster here: the patched engine runs 1.20x")
    assert ("The figure is unreliable: the machine is busy: its load average was 7.5 at the start" in verdict) is busy
    wide = speed_verdict({"speedup": 1.2, "speedup_ci": [1.01, 1.5], "backend": CPU})  # an idle machine, rounds apart
    assert "The figure is unreliable: the interval is wide (±20 %, more than ±10 %)" in wide


def _fidelity(values: list[float], random_weights: bool = False) -> dict:
    import numpy as np

    fid = {"images": len(values), "cosine_mean": float(np.mean(values)), "cosine_min": min(values),
           "per_image": [{"image": f"p{i}.jpg", "cosine": v} for i, v in enumerate(values)]}
    if random_weights:
        from hgdeploy.pipeline.context import STRUCTURE_ONLY

        fid["structure_check_only"] = STRUCTURE_ONLY
    return fid


@pytest.mark.parametrize("values, clause", [
    ([0.972, 0.975, 0.970, 0.9738], "; but fidelity cosine mean 0.9727 is below the budget cosine>=0.985"),
    ([0.995, 0.996, 0.994, 0.995], "; fidelity cosine mean 0.9950 meets the budget cosine>=0.985"),
    ([0.999, 0.975, 0.995, 0.983],
     "; but fidelity cosine mean 0.9880 meets the budget cosine>=0.985 on these images only"),
])
def test_the_verdict_holds_fidelity_to_the_budget_in_the_same_sentence(values, clause):
    from hgdeploy.measure.report import quality, quality_verdict
    from hgdeploy.tune.space import DEFAULT_BUDGET, parse_budget

    fid = _fidelity(values)
    report = {"speedup": 1.12, "speedup_ci": [1.08, 1.16], "backend": CPU, "fidelity": fid,
              "quality": quality(fid, parse_budget(DEFAULT_BUDGET))}
    verdict = speed_verdict(report)
    first = verdict.split(". ")[0]  # speed and quality in one sentence
    assert first.startswith("Faster here: the patched engine runs 1.12x") and clause in first, verdict
    assert report["quality"]["met"] is clause.endswith("meets the budget cosine>=0.985")
    body = clause.removeprefix("; ").removeprefix("but ")
    checked = quality_verdict(report)  # what `hgdeploy check`, which times nothing, ends with
    assert checked.startswith("F" + body[1:]) and checked.endswith(".")


def test_random_weights_make_the_quality_clause_a_structure_check():
    from hgdeploy.measure.report import quality
    from hgdeploy.tune.space import parse_budget

    fid = _fidelity([0.97, 0.98], random_weights=True)
    report = {"speedup": 0.9, "speedup_ci": [0.95, 1.02], "backend": CPU, "fidelity": fid,
              "quality": quality(fid, parse_budget("cosine>=0.985"))}
    first = speed_verdict(report).split(". ")[0]
    assert "fidelity cosine mean 0.9750 is a structure check only, not held against the budget cosine>=0.985" in first
    assert "random weights: these figures only show" in first and "below the budget" not in first


def test_run_reports_the_interval_the_load_and_fidelity_against_the_budget(tmp_path):
    """`hgdeploy run` end to end (the tiny timm recipe): report.json keeps every round, the interval and the load;
    the summary opens with speed and quality in one sentence; check and bench end with their own clause."""
    out = tmp_path / "out"
    ran = hgdeploy_main("run", *TINY_TIMM, "--out", str(out), "--budget", "cosine>=0.999")
    assert ran.returncode == 0, ran.stderr
    r = json.loads((out / "report.json").read_text())
    low, high = r["speedup_ci"]
    assert 0 < low <= high and len(r["latency"]["baseline"]["rounds_ms"]) == r["latency"]["baseline"]["runs"] == 15
    assert {"start", "end", "own_cores", "cpus", "busy"} <= set(r["load"]) and r["load"]["cpus"] >= 1
    assert r["quality"]["budget"] == "cosine>=0.999" and r["quality"]["structure_check_only"]  # random weights
    first = ran.stdout.split("## Summary\n\n")[1].split(". ")[0]
    assert first.startswith(("Faster here: ", "No measurable change here: ", "No gain here: ")), first
    assert "95 % CI" in first and "fidelity cosine mean" in first
    assert "is a structure check only, not held against the budget cosine>=0.999" in first
    assert speed_verdict(r) in (out / "report.md").read_text()

    checked = hgdeploy_main("check", *TINY_TIMM, "--out", str(out))
    assert checked.returncode == 0, checked.stderr
    assert "Fidelity cosine mean" in checked.stdout and "not held against the budget cosine>=0.985" in checked.stdout
    benched = hgdeploy_main("bench", *TINY_TIMM, "--out", str(out))
    assert benched.returncode == 0, benched.stderr
    assert "95 % CI" in benched.stdout and "fidelity is not measured by bench" in benched.stdout


def _write_graph(path: Path, op: str) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5000])
    nodes, outs, inits = [], [], []
    if op == "ScatterND":
        inits = [numpy_helper.from_array(np.zeros((1, 1), np.int64), "i"), numpy_helper.from_array(np.ones(1, np.float32), "u")]
        nodes = [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add", name="scatter")]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5000])]
    elif op == "TopK":
        inits = [numpy_helper.from_array(np.array([5000], np.int64), "k")]
        nodes = [helper.make_node("TopK", ["x", "k"], ["v", "j"], name="topk")]
        outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, [5000]),
                helper.make_tensor_value_info("j", TensorProto.INT64, [5000])]
    elif op == "NonZero":
        nodes = [helper.make_node("NonZero", ["x"], ["y"], name="nonzero")]
        outs = [helper.make_tensor_value_info("y", TensorProto.INT64, None)]
    elif op == "Col2Im":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])
        inits = [numpy_helper.from_array(np.array([3, 3], np.int64), "shape"),
                 numpy_helper.from_array(np.array([2, 2], np.int64), "block")]
        nodes = [helper.make_node("Col2Im", ["x", "shape", "block"], ["y"], name="col2im")]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("op", ["ScatterND", "TopK", "NonZero", "Col2Im"])
def test_lint_rejects_what_tensorrt_cannot_parse(tmp_path, op):
    path = tmp_path / f"{op}.onnx"
    _write_graph(path, op)
    result = hgdeploy_main("lint", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"({op})" in result.stdout


def test_a_user_error_or_ctrl_c_ends_in_one_line_not_a_traceback(capsys):
    """The one ending of the CLI and of scripts/: UserError -> exit 2, Ctrl-C -> exit 130, each one line."""
    from hgdeploy.core.errors import UserError, exit_code

    def interrupted() -> int:
        raise KeyboardInterrupt

    def refused() -> int:
        raise UserError("--only: no recipe named x; choose one of export/*.toml")

    assert exit_code(interrupted, "parity_bounds.py") == 130
    assert capsys.readouterr().err == "parity_bounds.py: interrupted\n"
    assert exit_code(refused, "parity_bounds.py") == 2
    assert capsys.readouterr().err == "parity_bounds.py: error: --only: no recipe named x; choose one of export/*.toml\n"
    assert exit_code(lambda: 1, "x") == 1 and exit_code(lambda: None, "x") == 0


def test_every_script_that_uses_hgdeploy_ends_through_exit_code():
    """A script interrupted with Ctrl-C says so in one line (its staging is removed on the way out)."""
    scripts = [p for p in (REPO / "scripts").glob("*.py")
               if "from hgdeploy" in p.read_text() and p.name != "common.py"]  # common: the scripts' helpers
    assert len(scripts) >= 10
    for script in scripts:
        assert f'sys.exit(exit_code(main, "{script.name}"))' in script.read_text(), script.name


CHILD = """
import os, shutil, sys, time
folder = sys.argv[1]
os.makedirs(folder)
open(folder + ".ready", "w").close()
try:
    time.sleep(60)
except KeyboardInterrupt:
    time.sleep(1)  # a clean-up slower than subprocess.run's 0.25 s of patience
    shutil.rmtree(folder)
    sys.exit(130)
"""
PARENT = """
import sys
sys.path[:0] = [{repo!r}, {repo!r} + "/scripts"]  # this checkout's hgdeploy; scripts/common, as a script sees it
import common
from hgdeploy import exit_code
common.CHILD_GRACE_S = 3  # more than the child's clean-up, which a second SIGINT would cut short
sys.exit(exit_code(lambda: common.run_child([sys.executable, "-c", {child!r}, sys.argv[1]]).returncode, "parent"))
"""


@pytest.mark.parametrize("whom", ["process group", "parent only"])
def test_a_script_interrupted_lets_its_hgdeploy_child_clean_up(tmp_path, whom):
    """Ctrl-C in a terminal reaches a script and the hgdeploy command it runs; scripts/common.run_child waits for
    the child's clean-up (its staging folders) instead of killing it, and interrupts the child itself when only
    the script was interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "staging"
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(repo=str(REPO), child=CHILD), str(folder)],
                              start_new_session=True, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (tmp_path / "staging.ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if whom == "process group":
        os.killpg(parent.pid, signal.SIGINT)
    else:
        parent.send_signal(signal.SIGINT)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130 and stderr.strip() == "parent: interrupted", stderr
    assert not folder.exists()  # the child finished removing it


def test_a_key_value_table_shortens_long_lists():
    """The export table once printed every fused node's name in one cell, wider than any terminal."""
    from hgdeploy.cli.show import flatten

    rows = dict(flatten({"fusion": {"nodes": [f"n{i}" for i in range(12)], "few": ["a", "b"]}}))
    assert rows == {"fusion.nodes": "12 items: n0, n1, n2, …", "fusion.few": ["a", "b"]}


def test_a_stray_file_among_the_photos_is_left_out_with_a_note(tmp_path, two_photos, capsys):
    from hgdeploy.measure.images import load_folder

    photos = tmp_path / "photos"
    shutil.copytree(two_photos, photos)
    (photos / "notes.txt").write_text("not a photo")
    loaded = load_folder(photos)
    assert [p.name for p in loaded] == sorted(p.name for p in two_photos.iterdir())
    assert "1 file that is not a jpg/png photo left out (notes.txt)" in capsys.readouterr().err
