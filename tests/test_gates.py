"""The gates seen failing: parity on the cosine alone and on the abs error alone, and `hgdeploy check` exiting 1
with one line saying why on an engine graph whose weights were changed after the export."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from conftest import TINY_TIMM, hgdeploy_main
from onnx import numpy_helper

from hgdeploy.measure.checks import cosine, parity


def test_parity_fails_on_the_cosine_alone():
    """An engine output in another direction but with an abs error far inside the bound fails, on the image where it
    happens (the worst image counts), and the reason names the cosine only."""
    ref = [{"y": np.array([1e-3, 0.0, 0.0], np.float32)}, {"y": np.array([0.0, 2e-3, 0.0], np.float32)}]
    same_direction = [{"y": r["y"] * 1.5} for r in ref]  # abs error 5e-4 and 1e-3, cosine 1
    turned = [same_direction[0], {"y": np.array([0.0, 1e-3, 1e-3], np.float32)}]  # image 2: cosine 1/sqrt(2)
    ok = parity(same_direction, ref, cosine_min=0.9999, max_abs=0.01)
    assert ok.passed and ok.failures() == [] and ok.cosine_min == pytest.approx(1.0)
    bad = parity(turned, ref, cosine_min=0.9999, max_abs=0.01)
    assert bad.cosine_min == pytest.approx(1 / np.sqrt(2)) and bad.max_abs == pytest.approx(1e-3)
    assert bad.per_output["y"]["max_abs"] <= bad.per_output["y"]["max_abs_threshold"]  # abs error within its bound
    assert not bad.passed
    assert len(bad.failures()) == 1 and bad.failures()[0].startswith("y: cosine 0.707107 < 0.9999")


def test_parity_fails_on_the_abs_error_alone_and_the_bound_grows_with_the_output():
    """One element off by 0.3 in an output of scale 10 keeps the cosine above 0.9999; the abs bound is max_abs plus
    max_abs_rel x the output's largest |reference| (or the output's own max_abs), and decides alone."""
    ref = np.linspace(-10.0, 10.0, 101)
    eng = ref.copy()
    eng[50] += 0.3  # ref[50] == 0: cosine = 1 / sqrt(1 + 0.09 / |ref|^2)
    expected_cos = 1 / np.sqrt(1 + 0.09 / float(ref @ ref))
    assert expected_cos > 0.9999

    def run(**bounds):
        return parity([{"y": eng}], [{"y": ref}], cosine_min=0.9999, **bounds)

    tight = run(max_abs=0.05, max_abs_rel=0.01)  # bound 0.05 + 0.01 x 10 = 0.15 < 0.3
    assert tight.cosine_min == pytest.approx(expected_cos, abs=1e-12) and tight.max_abs == pytest.approx(0.3)
    assert tight.per_output["y"]["scale"] == 10.0 and tight.per_output["y"]["max_abs_threshold"] == pytest.approx(0.15)
    assert not tight.passed and tight.failures() == ["y: max abs error 0.3 > 0.15"]
    assert run(max_abs=0.05, max_abs_rel=0.03).passed  # 0.05 + 0.3 = 0.35 >= 0.3
    assert run(max_abs=0.05, max_abs_rel=0.01, per_output_max_abs={"y": 0.2}).passed  # 0.2 + 0.1
    assert not run(max_abs=0.05, max_abs_rel=0.01, per_output_max_abs={"other": 0.2}).passed  # not this output's



def test_parity_passes_at_exactly_its_bounds_and_failures_agree_with_the_verdict():
    """The bounds are inclusive (cosine >= cosine_min, abs error <= its bound): an engine exactly at both passes,
    and failures() names nothing; a hair past either fails, and failures() names that bound only."""
    ref = [{"y": np.array([3.0, 4.0])}]
    eng = [{"y": np.array([3.0, 4.5])}]  # abs error 0.5
    cos = cosine(eng[0]["y"], ref[0]["y"])
    assert cos == pytest.approx(ref[0]["y"] @ eng[0]["y"] / (5.0 * np.linalg.norm(eng[0]["y"])), rel=1e-15)
    at = parity(eng, ref, cosine_min=cos, max_abs=0.5)
    assert at.cosine_min == cos and at.max_abs == 0.5
    assert at.passed and at.failures() == []
    past_cos = parity(eng, ref, cosine_min=np.nextafter(cos, 2.0), max_abs=0.5)
    past_abs = parity(eng, ref, cosine_min=cos, max_abs=np.nextafter(0.5, 0.0))
    assert not past_cos.passed and [f.split(":")[1].split()[0] for f in past_cos.failures()] == ["cosine"]
    assert not past_abs.passed and [f.split(":")[1].split()[0] for f in past_abs.failures()] == ["max"]

def _corrupted_copy(folder, dest, graph: str) -> None:
    """`folder` with `graph`'s largest weight negated; the other files hard-linked (copied where links fail)."""
    dest.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name != graph:
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
    model = onnx.load(str(folder / graph))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    onnx.save(model, str(dest / graph))


def test_check_exits_1_with_one_line_on_an_engine_graph_changed_after_export(tiny_export, two_photos, tmp_path):
    args = ["check", *TINY_TIMM, "--images", str(two_photos), "--json", "--out"]
    intact = hgdeploy_main(*args, str(tiny_export))
    assert intact.returncode == 0 and "parity failed" not in intact.stderr, intact.stderr
    engine_model = json.loads(intact.stdout)["parity"]["engine_model"]
    bad = tmp_path / "bad"
    _corrupted_copy(tiny_export, bad, engine_model)
    done = hgdeploy_main(*args, str(bad))
    report = json.loads(done.stdout)["parity"]
    assert done.returncode == 1 and not report["passed"] and report["engine_model"] == engine_model
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("✓", "note:", "memory:"))]
    assert len(lines) == 1 and lines[0].startswith("hgdeploy: parity failed: logits: "), done.stderr
    assert ("cosine" in lines[0]) == (report["cosine_min"] < report["thresholds"]["cosine_min"])
