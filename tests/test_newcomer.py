"""What a new user meets: bad output folders, random weights, stale exports, output routing and format.

Each test reproduces one report from a fresh-clone trial of the CLI and fails on the behaviour it
reported (results on stdout and no library noise: tests/test_cli.py's run test).
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_EXPORT, TINY_TIMM, hgdeploy_cli, hgdeploy_main

from hgdeploy.core.config import REPO_ROOT
from hgdeploy.measure.checks import HEATMAP_MIN_AREA, fidelity, heatmap_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = [a for s in SMALL_EXPORT for a in ("--set", s)]


hgdeploy = hgdeploy_cli


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("✓")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hgdeploy: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def quick_profile(tmp_path) -> Path:
    path = tmp_path / "quick.toml"
    path.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n')
    return path


# --- the output folder is validated before any work ------------------------------------------------


@pytest.mark.parametrize("command", ["run", "export"])
@pytest.mark.parametrize("where", ["an existing file", "under a file"])
def test_an_unusable_out_fails_at_once_with_one_line(tmp_path, command, where):
    afile = tmp_path / "somefile"
    afile.write_text("not a folder")
    out = afile if where == "an existing file" else afile / "sub"
    start = time.perf_counter()
    result = hgdeploy_main(command, *SMALL, "--out", str(out))
    message = one_line_error(result)
    assert "--out" in message and "not a folder" in message
    assert "Loading" not in result.stderr and time.perf_counter() - start < 60  # refused before the model loads
    assert afile.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


# --- random weights are flagged ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, two_photos) -> tuple[subprocess.CompletedProcess, Path]:
    """`hgdeploy run` of timm's tiny random ViT under umask 022: (the process, its output folder)."""
    root = tmp_path_factory.mktemp("tiny_run")
    profile = root / "quick.toml"
    profile.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n')
    out = root / "out"
    result = hgdeploy("run", *TINY_TIMM, "--images", str(two_photos), "--engine", str(profile), "--out", str(out),
                      umask=0o022)
    assert result.returncode == 0, result.stderr
    return result, out


def test_random_weights_mark_fidelity_as_a_structure_check(tiny_run):
    result, out = tiny_run
    assert "structure check only" in result.stdout  # the summary printed on stdout says so
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["pretrained"] is False and "random" in report["weights"]["source"]
    assert "random weights" in report["fidelity"]["structure_check_only"]
    assert "structure check only" in (out / "report.md").read_text()


def test_written_files_follow_the_users_umask(tiny_run):
    _, out = tiny_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes) >= {"baseline.onnx", "patched.onnx", "patched.opt.onnx", "report.json", "report.md"}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("command", ["check", "build", "bench", "optimize"])
def test_a_stale_export_is_refused_by_name(small_export, command, quick_profile):
    before = sorted(p.name for p in small_export.iterdir())
    result = hgdeploy_main(command, "--set", "model.input_size=112x112", "--set", "cluster.grid=5x5", "--engine",
                      str(quick_profile), "--out", str(small_export))
    message = one_line_error(result)
    assert "cluster.grid = '6x6'" in message and "'5x5'" in message
    assert sorted(p.name for p in small_export.iterdir()) == before


def test_the_export_records_its_plan_and_names_layers_by_alpha(small_export):
    import onnx

    from hgdeploy.core.contract import read_clustering_specs, read_export_info

    model = onnx.load(str(small_export / "patched.onnx"), load_external_data=False)
    info = read_export_info(model)
    assert info["plan"]["grid"] == "6x6" and info["recipe"]["values"]["cluster"]["grid"] == "6x6"
    alpha = info["plan"]["alpha"]
    scopes = [s["scope"] for s in read_clustering_specs(model)]
    assert scopes and all(f".{alpha}." in s for s in scopes), scopes  # clustering after alpha layers: index alpha


# --- output: on stdout, readable, quiet --------------------------------------------------------------


def test_bench_prints_one_row_per_runner(small_export, quick_profile):
    result = hgdeploy_main("bench", *SMALL, "--engine", str(quick_profile), "--out", str(small_export))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "engine, baseline" in out and "engine, patched" in out and "speedup" in out
    rows = [line for line in out.splitlines() if "engine," in line]
    assert len(rows) == len(set(rows)) and 2 <= len(rows) <= 3
    assert len(out.splitlines()) < 20


def test_families_table_keeps_brackets_and_whole_names_at_80_columns():
    result = hgdeploy_main("families")  # not a terminal, as when piped: nothing may be cut
    assert result.returncode == 0, result.stderr
    from hgdeploy.core.recipe import bundled_recipes

    assert "[model] options" in result.stdout
    for name in bundled_recipes():
        assert name in result.stdout, name
    assert "…" not in result.stdout


def test_a_profile_that_cannot_run_here_fails_before_the_model_loads(small_export):
    from hgdeploy.backends import availability, load_profile

    if availability(load_profile("ort-cuda")) is None:
        pytest.skip("this machine can run ort-cuda")
    for command in (["build", *SMALL, "--out", str(small_export)], ["run", *SMALL]):
        result = hgdeploy_main(*command, "--engine", "ort-cuda")
        assert "cannot run here" in one_line_error(result) and "Loading" not in result.stderr


def _out_help(command: str) -> str:
    """The --out entry of `hgdeploy COMMAND --help`, on one line."""
    text = " ".join(hgdeploy_main(command, "--help").stdout.split())
    return text.split("options:", 1)[1].split("--out DIR", 1)[1].split(" --", 1)[0]


def test_out_help_says_what_each_command_does_with_it():
    for command in ("check", "build", "optimize", "bench"):
        out_help = _out_help(command)
        assert "holding the export" in out_help and "output folder" not in out_help, (command, out_help)
        assert out_help.count("default") <= 1, (command, out_help)
    assert "output folder" in _out_help("run")


# --- heatmap IoU is not reported where it means nothing ---------------------------------------------


def test_heatmap_iou_is_undefined_on_a_nearly_empty_heatmap():
    base = np.zeros((1, 1, 100, 100))
    base[..., :2, :3] = 0.9  # 6 of 10,000 pixels salient, like the photo that gave IoU 0.005
    patched = np.zeros_like(base)
    patched[..., :1, :1] = 0.9
    assert 6 / 10_000 < HEATMAP_MIN_AREA
    assert heatmap_metrics(patched, base)["heatmap_iou"] is None
    good = np.zeros_like(base)
    good[..., :50, :] = 0.9
    fid = fidelity([{"h": patched}, {"h": good}], [{"h": base}, {"h": good}], {"h": "heatmap"}, ["empty", "full"])
    assert fid["heatmap_iou"] == 1.0 and fid["heatmap_iou_min"] == 1.0 and fid["heatmap_iou_undefined"] == 1
    assert fid["per_image"][0]["heatmap_iou"] is None


def test_what_the_readme_commands_write_is_git_ignored():
    """runs/ and the sample datasets (scripts/sample_datasets.py) never show up as changes to commit."""
    import shutil

    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("datasets/voc/images/a.jpg", "runs/dinov2_s14_focus/report.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"


# --- a run never replaces an earlier report without a word (issue 28, item 7) -----------------------------------


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """`hgdeploy run` in a fresh working directory with the pipeline replaced by one that writes report.json with
    the photos' names: the CLI's choice of folder and its notes are what is tested (seconds, no model)."""
    from types import SimpleNamespace

    from hgdeploy.pipeline import commands

    class Done:
        parity = SimpleNamespace(passed=True)

        def __init__(self, images):
            self.images = images

        def to_json(self):
            return {"images": self.images}

    def run(rec, engine, photos, out, budget):  # noqa: ANN001, ANN202
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"images": [p.name for p in photos]}))
        return Done([p.name for p in photos])

    monkeypatch.setattr(commands, "run", run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_run_on_your_photos_keeps_the_report_of_the_run_on_the_sample_photos(fake_run, two_photos):
    first = hgdeploy_main("run", *TINY_TIMM, "--json")
    assert first.returncode == 0, first.stderr
    samples = json.loads((fake_run / "runs/timm_vit_b16/report.json").read_text())["images"]
    assert len(samples) > 2
    mine = hgdeploy_main("run", *TINY_TIMM, "--images", str(two_photos), "--json")
    assert mine.returncode == 0, mine.stderr
    folder = fake_run / "runs" / f"timm_vit_b16-{two_photos.name}"
    assert json.loads((folder / "report.json").read_text())["images"] == sorted(p.name for p in two_photos.iterdir())
    assert json.loads((fake_run / "runs/timm_vit_b16/report.json").read_text())["images"] == samples  # kept
    note = [line for line in mine.stderr.splitlines() if line.startswith("note: no --out")]
    assert len(note) == 1 and f"runs/timm_vit_b16-{two_photos.name}" in note[0] and "--out" in note[0], mine.stderr
    assert "no --out" not in first.stderr  # the sample photos' run goes where it always went, without a note


def test_a_report_of_other_photos_is_named_before_it_is_replaced(fake_run, two_photos):
    out = fake_run / "mine"
    assert hgdeploy_main("run", *TINY_TIMM, "--out", str(out), "--json").returncode == 0
    again = hgdeploy_main("run", *TINY_TIMM, "--out", str(out), "--json")  # the same photos: a rerun, no note
    assert again.returncode == 0 and "note:" not in again.stderr, again.stderr
    other = hgdeploy_main("run", *TINY_TIMM, "--images", str(two_photos), "--out", str(out), "--json")
    assert other.returncode == 0, other.stderr
    notes = [line for line in other.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "earlier run on other photos" in notes[0] and "replaces it" in notes[0], other.stderr


def tune_ledger(folder: Path, recipe_values: dict, recipe_name: str, rows: list, best: int | None = 0):
    """A finished tune run's ledger built in code (no sweep): what `hgdeploy tune` hands its report writers."""
    from hgdeploy.tune.ledger import Ledger, Unpatched
    from hgdeploy.tune.space import parse_budget

    ledger = Ledger(context={"recipe": recipe_name, "values": recipe_values, "engine": "ort-cpu",
                             "images": [{"name": f"{i}.jpg"} for i in range(6)]},
                    budget=parse_budget("cosine>=0.985"), space={},
                    backend={"device": "cpu", "machine": {"cpu_count": 2}, "versions": {}}, folder=folder, rows=rows,
                    state="done", baseline=Unpatched(gflops=54.6, latency_ms=600.0), comparison=[])
    ledger.best = rows[best] if best is not None else None
    return ledger


def tune_row(key, kind, cosine, gflops=43.0, speedup=None, alpha=5, grid="28x28"):
    from hgdeploy.tune.ledger import Row

    plan = {"input_size": "476x476"} if kind == "downscale" else {
        "alpha": alpha, "grid": grid, "reconstruct_after": 12, "iters": 3, "tau": 0.05, "k": 4, "neighbours": 5,
        "reconstruction": "softmax", "reconstruct_on": "features", "reconstruct_from": "nearest",
        "method": "pool_bilinear" if kind == "pool_bilinear" else "cluster", "clustering_form": "local"}
    per_image = [{"cosine_mean": cosine + d} for d in (-0.001, 0.0, 0.001)]
    return Row(key=key, kind=kind, plan=plan, gflops=gflops, fidelity={"cosine_mean": cosine, "per_image": per_image},
               speedup=speedup, latency_ms=None if speedup is None else 600.0 / speedup)


def test_each_tuned_recipe_runs_into_its_own_folder_not_runs_best(fake_run):
    """issue 28: every best.toml ran into runs/best/, so the second tuned file's run replaced the first's."""
    from hgdeploy.core.recipe import load_recipe
    from hgdeploy.tune.report import write_results
    from hgdeploy.tune.run import header

    tiny = TINY_TIMM[1:]
    rec = load_recipe(TINY_TIMM[0], [tiny[i + 1] for i in range(0, len(tiny), 2)])
    folders = []
    for name, alpha in (("a", 1), ("b", 2)):  # the same recipe tuned twice (other budgets): two plans
        ledger = tune_ledger(fake_run / f"tune_{name}", rec.data, rec.name,
                             [tune_row("best", "clustering", 0.99, speedup=1.2, alpha=alpha, grid="3x3")])
        write_results(ledger, rec.data, header(ledger, 6))
        done = hgdeploy_main("run", str(fake_run / f"tune_{name}" / "best.toml"), "--json")
        assert done.returncode == 0, done.stderr
        written = [line for line in done.stderr.splitlines() if line.startswith("wrote ")]
        assert len(written) == 1, done.stderr
        folders.append(Path(written[0].split()[1]).parent)
    assert folders[0] != folders[1] and not (fake_run / "runs" / "best").exists()
    for folder, alpha in zip(folders, (1, 2)):
        assert folder.parent == Path("runs") and folder.name.startswith(f"timm_vit_b16-tuned-a{alpha}-3x3-"), folder
        assert (fake_run / folder / "report.json").is_file()


def test_a_tuned_name_that_is_no_folder_name_is_one_line(fake_run):
    result = hgdeploy_main("run", *TINY_TIMM, "--set", "tuned.name=../elsewhere")
    assert "tuned.name" in one_line_error(result) and "folder name" in result.stderr
    assert not (fake_run / "runs").exists() and not (fake_run.parent / "elsewhere").exists()


# --- eval's stdout shows what eval.md shows ---------------------------------------------------------------------


def eval_report(gate_passed: bool = True) -> dict:
    """An eval report as `hgdeploy eval` returns it (saliency, 2 images), built in code."""
    metrics = {"unpatched": {"MAE": 0.3564, "maxF": 0.85}, "patched": {"MAE": 0.35571, "maxF": 0.8525},
               "engine": {"MAE": 0.35572, "maxF": 85.25}}  # 85.25: a percent-scale value keeps its 4 decimals too
    agreement = {"patched": {"MAE": 0.0162, "maxF": 0.97684}, "engine": {"MAE": 0.0162, "maxF": 0.9768},
                 "engine_vs_patched": {"MAE": 0.0, "maxF": 1.0}}
    return {"recipe": {"name": "dinov2_s14_focus"}, "backend": {"name": "ort-cpu"},
            "dataset": {"path": "datasets/saliency", "layout": "saliency", "images": 2},
            "metrics": metrics, "agreement": agreement,
            "gate": {"metric": "agreement.engine_vs_patched.maxF", "value": 1.0, "task_agreement_min": 0.99,
                     "passed": gate_passed}}


def test_eval_prints_the_tables_eval_md_has(capsys):
    """issue 28: eval's stdout table mixed precisions (0.3557, 85.25, 1) and lacked Δ patched and the "vs unpatched"
    labels of eval.md."""
    from hgdeploy.cli.show import print_eval
    from hgdeploy.evaluation.report import tables

    report = eval_report()
    print_eval(report)
    shown = capsys.readouterr().out
    md_rows = [line for line in tables(report) if line.startswith("| ") and not line.startswith("| metric")]
    assert len(md_rows) == 4
    printed = [[c.strip() for c in line.strip().strip("│").split("│")] for line in shown.splitlines()
               if line.strip().startswith("│")]
    for md in md_rows:  # every row of eval.md, cell for cell, in the printed tables
        assert [c.strip() for c in md.strip("|").split("|")] in printed, (md, shown)
    for label in ("Δ patched", "Δ engine", "patched vs unpatched", "engine vs unpatched", "engine vs patched"):
        assert label in shown and label in "\n".join(tables(report)), label
    assert "85.2500" in shown and "+0.0025" in shown and "-0.0007" in shown
    assert "Task gate: agreement.engine_vs_patched.maxF = 1.0000 >= 0.99: passed." in shown


# --- tune.png says what it draws off the scale, and both panels have a legend ------------------------------------


def test_tune_png_names_the_points_off_its_scale_and_both_panels_have_a_legend(tmp_path, monkeypatch):
    """issue 28: avg-pool + bilinear points (cosine 0.85-0.89) were drawn at 0.925 without a word, and the right
    panel had no legend."""
    from matplotlib.figure import Figure

    from hgdeploy.tune.report import render_plot

    rows = [tune_row("best", "clustering", 0.989, 40.7, speedup=1.24), tune_row("c2", "clustering", 0.991, 43.0, 1.13),
            tune_row("p1", "pool_bilinear", 0.8647, 41.4, speedup=1.31), tune_row("p2", "pool_bilinear", 0.8816, 43.4),
            tune_row("p3", "pool_bilinear", 0.8500, 39.0), tune_row("d1", "downscale", 0.9766, 43.8, speedup=1.25)]
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or real(fig, *a, **k))
    png = render_plot(tune_ledger(tmp_path, {}, "r", rows))
    assert png.startswith(b"\x89PNG") and len(drawn) == 1
    left, right = drawn[0].axes
    for ax, off in ((left, 3), (right, 1)):
        low, _ = ax.get_ylim()
        ys = [y for c in ax.collections for _, y in c.get_offsets()]
        assert all(y >= low for y in ys)  # nothing is drawn outside the panel...
        title = ax.get_title()  # ...and what sits on its edge is said, with the true range
        assert f"{off} point{'s' if off > 1 else ''} below 0.925" in title, title
        assert ("0.8500–0.8816" if off == 3 else "0.8647–0.8647") in title, title
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        labels = {t.get_text() for t in legend.get_texts()}
        assert {"clustering", "unpatched", "best", "budget cosine>=0.985"} <= labels, labels
        assert any("avg-pool + bilinear" in label and "off the scale" in label for label in labels), labels


# --- eval.png shows where the engine differs and each row's figure -----------------------------------------------


def figure_rows(kind: str):
    """Two rows of eval.png (24x32 images) built in code: the engine differs from the unpatched model on 6 pixels."""
    from types import SimpleNamespace

    from PIL import Image

    from hgdeploy.evaluation.report import FigureRow

    rng = np.random.default_rng(0)
    rows = []
    for label, value in (("worst", 97.5), ("median", 99.25)):
        if kind == "segmentation":
            unpatched = rng.integers(0, 5, (24, 32))
            target = (unpatched.copy(), np.zeros((24, 32), bool))
        elif kind == "depth":
            unpatched = rng.uniform(1, 10, (24, 32)).astype(np.float32)
            target = (unpatched.copy(), np.ones((24, 32), bool))
        else:
            unpatched = rng.integers(0, 255, (24, 32)).astype(np.uint8)  # +1 stays in uint8
            target = (unpatched > 127, None)
        engine = unpatched.copy()
        if kind == "depth":
            engine[:2, :3] += 0.5
        else:
            engine[:2, :3] = (engine[:2, :3].astype(np.int64) + 1) % (5 if kind == "segmentation" else 256)
        preds = {"unpatched": unpatched, "patched": engine.copy(), "engine": engine}
        image = Image.fromarray(rng.integers(0, 256, (24, 32, 3)).astype(np.uint8))
        rows.append(FigureRow(label, SimpleNamespace(stem=f"img_{label}"), image, target, preds,
                              {"segmentation": "aAcc", "depth": "delta1"}.get(kind, "MAE"),
                              {"patched": value, "engine": value - 0.5}))
    return rows


@pytest.mark.parametrize("kind", ["segmentation", "depth", "heatmap"])
def test_eval_png_has_a_difference_column_and_each_rows_metric(kind):
    """issue 28: eval.png showed patched and engine side by side with no difference map or per-row metric."""
    import io

    from PIL import Image

    from hgdeploy.evaluation.report import PANEL_HEIGHT, difference, render_figure, row_title

    rows = figure_rows(kind)
    png = Image.open(io.BytesIO(render_figure(rows, kind)))
    panel = round(32 * PANEL_HEIGHT / 24)  # each panel at PANEL_HEIGHT, aspect kept
    assert png.width == 6 * panel  # image | ground truth | unpatched | patched | engine | difference
    assert png.height > 2 * (PANEL_HEIGHT + 16)  # and a title line above each row
    rgb, caption, summary = difference(kind, rows[0].preds["engine"], rows[0].preds["unpatched"])
    changed = (rgb != 255).any(-1)
    assert changed.sum() == 6 and changed[:2, :3].all()  # exactly where the engine differs
    assert caption == ("engine != unpatched" if kind == "segmentation" else "|engine - unpatched|")
    expected = {"segmentation": f"{6 / 768:.1%} of pixels changed label", "depth": "max 0.5 ",
                "heatmap": f"max {1 / 255:.3g} "}[kind]
    assert expected in summary, summary
    title = row_title(rows[0], summary)
    metric = {"segmentation": "aAcc", "depth": "delta1"}.get(kind, "MAE")
    assert title.startswith(f"worst image by engine vs unpatched {metric}: img_worst") and summary in title
    assert f"patched vs unpatched {97.5:.4f}" in title and f"engine vs unpatched {97.0:.4f}" in title, title
