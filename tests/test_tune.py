"""`hgdeploy tune`: the budget and the space, the replayed blocks, the baselines at equal cost, the choice of the
best plan, and a whole sweep on a tiny model: its files, resuming it, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_TIMM, hgdeploy_main

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ModelFacts, PlanRequest
from hgdeploy.core.preprocess import Preprocess
from hgdeploy.core.recipe import load_recipe
from hgdeploy.tune.downscale import resize_output, smaller_sizes
from hgdeploy.tune.ledger import Row
from hgdeploy.tune.report import best_recipe
from hgdeploy.tune.select import matched, select_best, to_time
from hgdeploy.tune.space import candidates, default_space, parse_budget, read_space

TINY_SPACE = """[space]
alpha = [1, 2]
grid = ["3x3", "2x2"]
iters = [1]
reconstruct_from = ["nearest"]
timed = 1
"""


def test_a_budget_names_a_metric_a_direction_and_a_bound():
    b = parse_budget("cosine>=0.985")
    assert (b.key, b.met({"cosine_mean": 0.99}), b.met({"cosine_mean": 0.98}), b.met({})) == \
        ("cosine_mean", True, False, False)
    assert parse_budget("depth_rel_error<=0.05").met({"depth_rel_error": 0.04})
    with pytest.raises(UserError, match="upper bound: depth_rel_error<=0.05"):
        parse_budget("depth_rel_error>=0.05")
    with pytest.raises(UserError, match="lower bound: cosine>=0.9"):
        parse_budget("cosine<=0.9")
    with pytest.raises(UserError, match="quote it"):  # what the shell leaves of an unquoted cosine>=0.985
        parse_budget("cosine")


def test_a_space_file_replaces_axes_and_refuses_what_it_does_not_know(tmp_path):
    good = tmp_path / "space.toml"
    good.write_text(TINY_SPACE + 'tau = ["auto", 0.5]\n')
    values = read_space(good)
    assert values["grid"] == ((3, 3), (2, 2)) and values["tau"] == ("auto", 0.5) and values["timed"] == 1
    for body, needle in (("[space]\nalhpa = [1]\n", "unknown key space.alhpa"),
                         ("[space]\ngrid = ['big']\n", "must look like '24x24'"),
                         ("[space]\nform = ['sparse']\n", "must be one of auto, dense, local"),
                         ("[cluster]\nalpha = [1]\n", "expected one [space] table")):
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(UserError, match=needle.replace("[", r"\[")):
            read_space(bad)


def test_plans_go_from_most_clusters_to_fewest_within_each_alpha():
    facts = ModelFacts(token_grid=(37, 37), depth=12, preprocess=Preprocess((518, 518)))
    request = load_recipe(None).request
    space = default_space(facts, request, "cpu")
    assert request.alpha in space.alpha and request.grid in space.grid and space.tau == ("auto",)
    assert default_space(facts, request, "gpu").form == ("dense", "local")  # both timed on a GPU
    plans = list(candidates(space, request, facts))
    assert len(plans) == len(space.alpha) * len(space.grid) * len(space.iters) * len(space.reconstruct_from)
    for group in {c.group for c in plans}:
        sizes = [c.request.grid[0] * c.request.grid[1] for c in plans if c.group == group]
        assert sizes == sorted(sizes, reverse=True)
    assert [c.request.alpha for c in plans] == sorted(c.request.alpha for c in plans)


def _tiny_models():
    from hgdeploy.patch.models import build_models

    args = TINY_TIMM[1:]
    return build_models(load_recipe(TINY_TIMM[0], [args[i + 1] for i in range(0, len(args), 2)]), "cpu")


def test_replayed_blocks_give_the_patched_model_its_own_outputs_and_are_really_used():
    from hgdeploy.patch.models import patch_for
    from hgdeploy.tune.replay import PrefixCache, find_blocks

    models = _tiny_models()
    facts = models.family.facts(models.baseline)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    cache = PrefixCache(models.baseline, find_blocks(models.baseline, models.patched, 1, facts.depth), images,
                        models.family.output_names, upto=2)
    with torch.no_grad():
        assert np.allclose(cache.outputs[1]["logits"], models.baseline(images[1:2])[0].numpy())
    _, patched = patch_for(models.family, models.baseline, facts, PlanRequest(2, (2, 2), 4, {"k": 4}), "cpu")
    replayed = cache.run(patched, alpha=2)
    with torch.no_grad():
        plain = [patched(images[i:i + 1])[0].numpy() for i in range(2)]
    for i in range(2):
        assert np.allclose(replayed[i]["logits"], plain[i], atol=1e-6)
    cache.answers[0][1] = cache.answers[0][1] * 0  # a wrong recorded block answer must show in the output
    assert not np.allclose(cache.run(patched, alpha=2)[0]["logits"], plain[0], atol=1e-3)
    assert "forward" not in vars(next(iter(find_blocks(models.baseline, models.patched, 1, facts.depth))))


def test_downscaled_outputs_come_back_in_the_full_size_shapes():
    assert list(smaller_sizes((518, 518), (37, 37)))[:2] == [(504, 504), (490, 490)]
    tokens = np.arange(2 * (1 + 4) * 3, dtype=np.float32).reshape(2, 5, 3)  # one prefix token, 2x2 grid
    full = resize_output(tokens, "tokens", np.zeros((2, 1 + 16, 3)), (2, 2), (4, 4))
    assert full.shape == (2, 17, 3) and np.array_equal(full[:, 0], tokens[:, 0])
    assert np.allclose(full[:, 1:].mean(1), tokens[:, 1:].mean(1))  # bilinear keeps a 2x2 grid's mean
    heat = resize_output(np.ones((1, 1, 8, 8), np.float32), "heatmap", np.zeros((1, 1, 16, 16)), (2, 2), (4, 4))
    assert heat.shape == (1, 1, 16, 16) and np.allclose(heat, 1)


def _row(kind, key, gflops, cosine, speedup=None, alpha=6, grid="28x28"):
    plan = {"input_size": "476x476"} if kind == "downscale" else {"alpha": alpha, "grid": grid, "reconstruct_after": 12}
    return Row(key=key, kind=kind, plan=plan, gflops=gflops, fidelity={"cosine_mean": cosine}, speedup=speedup)


def test_the_best_plan_is_within_budget_and_faster_and_baselines_are_matched_at_no_less_cost():
    budget = parse_budget("cosine>=0.985")
    rows = [_row("clustering", "fast-but-blurry", 30, 0.97, 1.6), _row("clustering", "slower", 44, 0.99, 0.95),
            _row("clustering", "good", 43, 0.99, 1.2), _row("pool_bilinear", "pool", 43.4, 0.89, 1.3),
            _row("downscale", "d1", 42.5, 0.97, 1.3), _row("downscale", "d2", 43.8, 0.975, 1.25)]
    assert select_best(rows, budget).key == "good"  # not the blurry one, never a slower one
    assert select_best([rows[0], rows[1]], budget) is None
    good = next(c for c in matched(rows, budget) if c["key"] == "good")
    assert good["downscale"]["key"] == "d2"  # d1 is cheaper than the plan: not an equal-cost baseline
    assert good["pool_bilinear"]["clustering_better"] and good["downscale"]["clustering_better"]


def test_the_cheapest_plans_and_their_matched_baselines_are_timed_first():
    budget = parse_budget("cosine>=0.985")
    rows = [_row("clustering", "cheap", 40, 0.99, grid="24x24"), _row("clustering", "mid", 42, 0.99),
            _row("clustering", "blurry", 30, 0.9, grid="20x20"),
            _row("pool_bilinear", "pool24", 39.9, 0.9, grid="24x24"),
            _row("pool_bilinear", "pool28", 41.9, 0.9), _row("downscale", "d41", 41, 0.97),
            _row("downscale", "d43", 43, 0.975), _row("clustering", "recipe", 43.5, 0.99, speedup=1.1)]
    rows[-1].recipe = True
    must, more = to_time(rows, budget, baseline_gflops=55, timed=1)
    assert [r.key for r in must] == ["cheap", "pool24", "d41"] and more == []  # the recipe's is timed already
    must, more = to_time(rows, budget, baseline_gflops=55, timed=6)
    assert [r.key for r in must][:3] == ["cheap", "pool24", "d41"] and {"mid", "pool28", "d43"} <= {r.key for r in must}
    assert "blurry" not in {r.key for r in must + more}  # outside the budget: never timed


def test_best_toml_is_a_recipe_the_other_commands_take(tmp_path):
    rec = load_recipe(None)
    row = {"plan": {"alpha": 5, "grid": "24x24", "reconstruct_after": 12, "iters": 3, "tau": 0.07, "k": 4,
                    "form": "auto", "clustering_form": "local", "method": "cluster", "neighbours": 5}}
    path = tmp_path / "best.toml"
    path.write_text(best_recipe(rec.data, row["plan"], ["tuned in a test"], rec.name))
    best = load_recipe(str(path))
    assert (best.request.alpha, best.request.grid, best.request.options["tau"], best.request.options["form"]) == \
        (5, (24, 24), 0.07, "local")
    assert best.data["model"] == rec.data["model"] and "ci" not in best.data
    assert best.data["tuned"]["recipe"] == rec.name and best.name.startswith(f"{rec.name}-tuned-a5-24x24-")
    again = tmp_path / "again.toml"  # a tuned recipe tuned again names the recipe it all comes from
    again.write_text(best_recipe(best.data, {**row["plan"], "alpha": 4}, ["tuned twice"], best.name))
    assert load_recipe(str(again)).name.startswith(f"{rec.name}-tuned-a4-24x24-")


def _tune_args(tmp_path, two_photos, budget="cosine>=0.5"):
    space = tmp_path / "space.toml"
    space.write_text(TINY_SPACE)
    return ["tune", *TINY_TIMM, "--images", str(two_photos), "--budget", budget, "--space", str(space), "--out",
            str(tmp_path / "tune")]


@pytest.fixture
def pinned_latency(monkeypatch):
    """The engines still run and are timed, but every timed plan reports 8 ms against the unpatched model's 10 ms:
    whether a plan is faster must not depend on a shared 2-core machine's mood, or a test cannot tell "a plan" from
    "no plan". The choice among plans, the files, the exit code and the held-out check are what is tested."""
    from hgdeploy.measure.timing import Timing
    from hgdeploy.pipeline import engines

    real = engines.time_runners

    def pinned(runners, feed, engine, feeds=None, what=None):  # noqa: ANN001, ANN202
        measured = real(runners, feed, engine, feeds, what)
        return {k: Timing(10.0 if k == "baseline" else 8.0, 10.0 if k == "baseline" else 8.0, 1.0, t.runs)
                for k, t in measured.items()}

    monkeypatch.setattr(engines, "time_runners", pinned)


def test_tune_measures_plans_and_baselines_writes_its_files_and_resumes(tmp_path, two_photos, pinned_latency):
    args = _tune_args(tmp_path, two_photos)
    first = hgdeploy_main(*args, "--holdout", str(two_photos), "--json")
    result = json.loads(first.stdout)
    assert first.returncode == 0, first.stderr
    best = result["best"]  # every timed plan is faster: the best is a timed clustering plan within the budget
    assert best is not None and best["kind"] == "clustering" and best["speedup"] == pytest.approx(1.25)
    assert parse_budget("cosine>=0.5").met(best["fidelity"])
    held = best["holdout"]  # held out on the tuning photos themselves: the same images, the same mean
    assert held["within_budget"] and held["images"] == 2
    assert held["fidelity"]["cosine_mean"] == pytest.approx(best["fidelity"]["cosine_mean"], abs=1e-6)
    out = tmp_path / "tune"
    assert {p.name for p in out.iterdir()} >= {"tune.json", "tune.md", "tune.png", "best.toml"}
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"clustering", "pool_bilinear", "downscale"}
    for r in result["rows"]:
        assert r["gflops"] > 0 and r["fidelity"]["cosine_mean"] is not None
    timed = [r for r in result["rows"] if r.get("speedup") is not None]
    assert any(r.get("recipe") for r in timed) and {r["kind"] for r in timed} == kinds
    for r in timed:
        assert r["speedup"] == pytest.approx(r["baseline_latency_ms"] / r["latency_ms"])
    assert result["comparison"] and result["state"] == "done"
    assert "random weights" in result["structure_check_only"]  # fidelity of random weights says nothing

    built = []  # same folder: every row is found again, nothing is built, scored or timed again (baselines included)
    with pytest.MonkeyPatch.context() as mp:
        from hgdeploy.tune import replay, score

        for where, name in ((score, "patch_for"), (score, "downscale_outputs"), (replay.PrefixCache, "run")):
            real = getattr(where, name)
            mp.setattr(where, name, lambda *a, real=real, name=name, **k: built.append(name) or real(*a, **k))
        again = hgdeploy_main(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert built == [], built
    resumed = json.loads(again.stdout)
    assert resumed["resumed_rows"] == len(result["rows"])
    assert {r["key"]: r.get("latency_ms") for r in resumed["rows"]} == {r["key"]: r.get("latency_ms")
                                                                         for r in result["rows"]}
    assert "Timing" not in again.stderr

    strict = hgdeploy_main(*_tune_args(tmp_path, two_photos, "cosine>=0.9999999")[:-1], str(tmp_path / "strict"))
    assert strict.returncode == 1 and "no plan is within the budget" in strict.stdout
    assert not (tmp_path / "strict" / "best.toml").exists()
    pruned = json.loads((tmp_path / "strict" / "tune.json").read_text())["pruned"]
    assert pruned and all("larger grid" in p["reason"] for p in pruned)  # 3x3 missed: 2x2 never ran
    assert {p["plan"]["grid"] for p in pruned} == {"2x2"}

    other = hgdeploy_main(*args[:-1], str(out), "--set", "cluster.k=3")
    assert other.returncode == 2 and "other recipe values" in other.stderr


def test_ctrl_c_keeps_a_valid_tune_json_and_the_rerun_resumes(tmp_path, two_photos, pinned_latency):
    args = _tune_args(tmp_path, two_photos)
    out = tmp_path / "tune"
    env = dict(os.environ, NO_COLOR="1")
    # SIGINT as a terminal's Ctrl-C delivers it; a shell's background job starts with SIGINT ignored, which a
    # child inherits, so it is restored first (else this test fails wherever CI runs in the background).
    proc = subprocess.Popen([sys.executable, "-m", "hgdeploy.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "tune.json").read_text())["rows"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    saved = json.loads((out / "tune.json").read_text())
    assert saved["state"] == "interrupted" and len(saved["rows"]) >= 2
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written file left
    rerun = hgdeploy_main(*args, "--json")  # in this process: its timings are pinned, a plan is found
    assert rerun.returncode == 0, rerun.stderr
    resumed = json.loads(rerun.stdout)
    assert resumed["resumed_rows"] >= 2 and resumed["state"] == "done" and resumed["best"] is not None


# ------------------------------------------------------------------------------------------- --time-limit

# Enough plans that scoring them all (0.5-1 s each on TINY_TIMM) takes longer than the limit below.
BIG_SPACE = """[space]
alpha = [1, 2, 3]
grid = ["3x3", "2x2", "1x1"]
iters = [1, 2]
reconstruct_from = ["nearest", "neighbourhood"]
timed = 2
"""
LIMIT_MIN = 0.5  # 30 s: loading, the recipe's plan and the time kept for the rest take about 20 s on 2 busy cores
EXPORT_S = 2.0  # what each export of the fake engine below takes
SCORE_S = 0.5  # what the fake engine adds to each plan's scoring: 47 plans cannot all be scored within the limit


@pytest.fixture(scope="module")
def fake_engine():
    """An engine whose exports take EXPORT_S each, whose scoring takes SCORE_S more, and whose timings are pinned
    (every plan 8 ms against the unpatched model's 10 ms): no graph is written, so what a step costs is known and the
    time logic, not the machine's speed, decides whether a test keeps its limit (a fast CI machine scored all 47
    plans of the tiny model within 30 s, and nothing was left to skip)."""
    from hgdeploy.measure.timing import Timing
    from hgdeploy.pipeline import engines
    from hgdeploy.tune import latency, score

    class Export:  # what the export road returns: the graphs a profile runs
        def baseline_graph(self, engine):  # noqa: ANN001, ANN202
            return Path("baseline.onnx")

        def patched_graph(self, engine):  # noqa: ANN001, ANN202
            return Path("patched.onnx")

    def export(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(EXPORT_S)
        return Export(), None

    def timed(runners, feed, engine, feeds=None, what=None):  # noqa: ANN001, ANN202
        time.sleep(0.05 * len(runners))
        return {k: Timing(10.0 if k == "baseline" else 8.0, 10.0, 1.0, 15) for k in runners}

    scored = score.Scorer.score

    def slow_score(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(SCORE_S)
        return scored(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(score.Scorer, "score", slow_score)
        mp.setattr(latency, "write_deployable", export)
        mp.setattr(latency, "make_runner", lambda path, engine: path)
        mp.setattr(engines, "zeros_feed", lambda path: {})
        mp.setattr(engines, "time_runners", timed)
        yield


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory, two_photos, fake_engine):
    """A sweep of BIG_SPACE under --time-limit LIMIT_MIN: its folder, the finished command and its wall time."""
    root = tmp_path_factory.mktemp("limited")
    space = root / "space.toml"
    space.write_text(BIG_SPACE)
    args = ["tune", *TINY_TIMM, "--images", str(two_photos), "--budget", "cosine>=0.5", "--space", str(space),
            "--out", str(root / "tune"), "--time-limit", str(LIMIT_MIN)]
    began = time.monotonic()
    done = hgdeploy_main(*args)
    return root / "tune", args, done, time.monotonic() - began


def test_tune_keeps_its_time_limit_and_times_the_cheapest_plans_with_their_baselines(limited_run):
    out, _, done, wall = limited_run
    assert done.returncode == 0, done.stderr
    assert wall <= 1.1 * LIMIT_MIN * 60, (wall, done.stderr)
    result = json.loads((out / "tune.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    budget = parse_budget("cosine>=0.5")
    fits = sorted((r for r in rows.values() if r["kind"] == "clustering" and budget.met(r["fidelity"])
                   and r["gflops"] < result["baseline"]["gflops"]), key=lambda r: r["gflops"])
    assert fits and fits[0].get("speedup") is not None  # the cheapest plan within the budget is timed
    matched_twins = next(c for c in result["comparison"] if c["key"] == fits[0]["key"])
    for name in ("pool_bilinear", "downscale"):  # and its baselines at equal cost, scored and timed
        assert rows[matched_twins[name]["key"]].get("speedup") is not None, name
    # what the limit left out is "skipped for time", apart from the pruned plans, in tune.json, tune.md and stdout
    assert result["skipped"] and all(s["reason"].startswith("skipped for time") for s in result["skipped"])
    assert {s["key"] for s in result["skipped"]}.isdisjoint(p["key"] for p in result["pruned"])
    assert not [p for p in result["pruned"] if "time" in p["reason"]]
    assert result["state"] == "stopped at --time-limit"
    assert "Skipped for time" in (out / "tune.md").read_text()
    assert "skipped for time" in done.stdout


def test_an_interrupted_resume_leaves_no_conclusion_of_the_earlier_run(limited_run, monkeypatch):
    from hgdeploy.tune import replay

    out, args, first, _ = limited_run
    assert first.returncode == 0 and {"tune.md", "tune.png", "best.toml"} <= {p.name for p in out.iterdir()}
    folder = out.stat().st_ino

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(replay.PrefixCache, "__init__", interrupted)  # Ctrl-C while the resumed run starts
    again = hgdeploy_main(*args)
    assert again.returncode == 130, again.stderr
    saved = json.loads((out / "tune.json").read_text())
    assert saved["state"] == "interrupted" and saved["best"] is None
    assert not {"tune.md", "tune.png", "best.toml"} & {p.name for p in out.iterdir()}  # none contradicts it
    assert out.stat().st_ino == folder and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
