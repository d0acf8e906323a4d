"""The pipeline's promises: one export road, one typed export folder, each command's recipe read once."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import SMALL_EXPORT, TINY_TIMM, hgdeploy_main

import hgdeploy.core.recipe as recipe_module
from hgdeploy.core.errors import UserError
from hgdeploy.evaluation.samples import write_saliency
from hgdeploy.graph.folder import GRAPH_FILES, MANIFEST, ExportFolder, recipe_difference

# one plan scored and none exported or timed: the test counts reads of the recipe file, nothing else
TINY_SPACE = '[space]\nalpha = [1]\ngrid = ["2x2"]\niters = [1]\nreconstruct_from = ["nearest"]\nbaselines = []\ntimed = 0\n'
FOCUS = [a for s in SMALL_EXPORT for a in ("--set", s)]


def _commands(tmp_path, tiny_export, small_export, two_photos):
    space = tmp_path / "space.toml"
    space.write_text(TINY_SPACE)
    saliency = write_saliency(tmp_path / "sal")
    out = ["--out", str(tiny_export)]
    return {
        "run": ["run", *TINY_TIMM, "--images", str(two_photos), "--out", str(tmp_path / "run")],
        "export": ["export", *TINY_TIMM, "--out", str(tmp_path / "export")],
        "check": ["check", *TINY_TIMM, "--images", str(two_photos), *out],
        "flops": ["flops", *TINY_TIMM],
        "bench": ["bench", *TINY_TIMM, "--torch", *out],
        "bench --out": ["bench", *TINY_TIMM, *out],
        "optimize": ["optimize", *TINY_TIMM, *out],
        "build": ["build", *TINY_TIMM, *out],
        "triton": ["triton", *TINY_TIMM, *out, "--repo", str(tmp_path / "triton")],
        "eval": ["eval", *FOCUS, "--dataset", str(saliency), "--limit", "1", "--export", str(small_export), "--out",
                 str(tmp_path / "eval")],
        "tune": ["tune", *TINY_TIMM, "--images", str(two_photos), "--budget", "cosine>=0.5", "--space", str(space),
                 "--out", str(tmp_path / "tune")],
    }


COMMANDS = ["run", "export", "check", "flops", "bench", "bench --out", "optimize", "build", "eval", "tune",
            "triton"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_reads_its_recipe_file_once(command, tmp_path, tiny_export, small_export, two_photos,
                                                 monkeypatch):
    """The recipe is read by the command line's argument group and handed down, never loaded again."""
    reads = []
    real = recipe_module.read_recipe_file

    def counted(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(recipe_module, "read_recipe_file", counted)
    args = _commands(tmp_path, tiny_export, small_export, two_photos)[command]
    done = hgdeploy_main(*args, "--json")
    assert done.returncode in (0, 1), done.stderr  # tune may find no faster plan on a busy 2-core machine
    assert len(reads) == 1, reads


def test_the_export_folder_lists_its_graphs_and_what_each_profile_runs(small_export):
    folder = ExportFolder.open(small_export, recipe_values(small_export))
    # a plain (TensorRT) fp16 export; commands run with ort-cpu on it (eval --export) derive its fused fp32 twins
    assert set(GRAPH_FILES) - {"baseline_fused", "patched_fused"} - set(folder.graphs) == {
        "baseline_fused_fp16", "patched_fused_fp16"}
    fp16 = SimpleNamespace(name="p16", precision="fp16", fused_attention=False)
    fp32 = SimpleNamespace(name="p32", precision="fp32", fused_attention=False)
    assert folder.engine_graphs(fp16) == {"baseline": small_export / "baseline.fp16.onnx",
                                          "patched": small_export / "patched.fp16.onnx"}
    assert folder.engine_graphs(fp32) == {"baseline": small_export / "baseline.onnx",
                                          "patched": small_export / "patched.opt.onnx",
                                          "patched_unoptimized": small_export / "patched.onnx"}
    manifest = json.loads((small_export / MANIFEST).read_text())
    assert set(manifest["graphs"]) == set(folder.graphs) and manifest["plan"] == folder.recorded_plan
    fused = SimpleNamespace(name="ort-cuda-fp16", precision="fp16", fused_attention=True)
    with pytest.raises(UserError, match="patched.fused.fp16.onnx not found: the ort-cuda-fp16 profile runs fused fp16"):
        folder.patched_graph(fused)  # a TensorRT export holds no fused graphs: said, not a plain graph instead


def test_a_profile_gets_its_twins_derived_from_an_export_made_for_another(small_export, tmp_path, capsys):
    """The export was made for trt-fp16 (plain fp16 twins); ort-cpu runs fused fp32 twins: they are derived from
    the export's graphs (the patched one from the graph passes' result), said on stderr, listed in the manifest."""
    import os
    import shutil

    import onnx

    from hgdeploy.backends import load_profile
    from hgdeploy.graph.deploy import with_twins

    copy = tmp_path / "export"
    shutil.copytree(small_export, copy, copy_function=os.link, ignore=shutil.ignore_patterns("*.fused.*"))
    folder = with_twins(ExportFolder.open(copy, recipe_values(copy)), load_profile("ort-cpu"))
    assert "no baseline or patched graph for ort-cpu: deriving them from the export" in capsys.readouterr().err
    assert folder.engine_graphs(load_profile("ort-cpu")) == {"baseline": copy / "baseline.fused.onnx",
                                                             "patched": copy / "patched.fused.onnx"}
    ops = {n.op_type for n in onnx.load(str(copy / "patched.fused.onnx"), load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops and "Where" in ops  # fused, from the passes' result (its masks)
    assert {"baseline_fused", "patched_fused"} <= set(json.loads((copy / MANIFEST).read_text())["graphs"])
    assert with_twins(folder, load_profile("ort-cpu")) == folder and capsys.readouterr().err == ""


def recipe_values(folder):
    return ExportFolder.scan(folder).info["recipe"]["values"]


def test_an_export_folder_refuses_what_it_cannot_be(small_export, tmp_path):
    with pytest.raises(UserError, match="baseline.onnx, .*patched.onnx not found"):
        ExportFolder.open(tmp_path, {})
    values = recipe_values(small_export)
    other = json.loads(json.dumps(values))
    other["cluster"]["grid"] = "5x5"
    with pytest.raises(UserError, match="exported with cluster.grid = '6x6', but this command asks for '5x5'"):
        ExportFolder.open(small_export, other)
    fp32_only = ExportFolder(small_export, {"baseline": small_export / "baseline.onnx",
                                            "patched": small_export / "patched.onnx"})
    profile = SimpleNamespace(name="ort-cuda-fp16", precision="fp16", fused_attention=False)
    with pytest.raises(UserError, match="hgdeploy export --engine ort-cuda-fp16"):
        fp32_only.patched_graph(profile)
    assert recipe_difference({"ci": {"set": ["a"]}, "x": {"k": 1}}, {"x": {"k": 1}}) is None
    tuned = {"tuned": {"recipe": "r", "name": "r-tuned-a5-28x28-abcdef"}, "x": {"k": 1}}  # best.toml's origin
    assert recipe_difference(tuned, {"x": {"k": 1}}) is None and recipe_difference({"x": {"k": 1}}, tuned) is None
