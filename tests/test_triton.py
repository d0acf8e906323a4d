"""`hgdeploy triton`: every config.pbtxt is valid for Triton's own schema and declares the graph's tensors, the
repository serves the export's graphs, bad input leaves nothing behind.

Triton's schema is the `model_config_pb2` module tritonclient ships, loaded by its path: importing
`tritonclient.grpc` needs grpcio (its grpc extra pins protobuf < 7), while this one module needs protobuf alone.
No Triton server runs here: its onnxruntime backend ships only in NVIDIA's containers (README "Serving with
Triton").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DYNAMIC, TINY_TIMM, hgdeploy_main
from google.protobuf import text_format
from onnx import TensorProto, helper

from hgdeploy.backends import load_profile
from hgdeploy.backends.profile import BUNDLED_PROFILES
from hgdeploy.core.errors import UserError
from hgdeploy.core.recipe import load_recipe
from hgdeploy.graph.folder import ExportFolder
from hgdeploy.pipeline import triton

# Triton's data types as numpy's, written here independently of the module under test.
TRITON_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
                "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}
PROFILES = sorted(p.stem for folder in BUNDLED_PROFILES for p in Path(folder).glob("*.toml"))


def model_config_pb2():
    """Triton's model_config.proto as tritonclient ships it (tritonclient/grpc/model_config_pb2.py)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("tritonclient is not installed: pip install -e '.[dev]'")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema():
    return model_config_pb2()


def parse(text: str, schema):
    """config.pbtxt as Triton reads it: text format into its ModelConfig; an unknown field or enum value raises."""
    return text_format.Parse(text, schema.ModelConfig())


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """The tiny timm model exported for ort-cpu (baseline/patched and their fused twins, which ort-cpu runs)."""
    out = tmp_path_factory.mktemp("triton_export") / "export"
    done = hgdeploy_main("export", *TINY_TIMM, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def write_repo(export: Path, repo: Path, *extra: str) -> dict:
    done = hgdeploy_main("triton", *TINY_TIMM, "--out", str(export), "--repo", str(repo), "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("triton_repo") / "repo"
    return path, write_repo(tiny_export, path)


def engine_graphs(export: Path, profile: str, *sets: str) -> dict[str, Path]:
    """The baseline and patched graphs `profile` runs from the tiny export (with --set `sets` on top)."""
    folder = ExportFolder.open(export, load_recipe(TINY_TIMM[0], [*TINY_TIMM[2::2], *sets]).data)
    graphs = folder.engine_graphs(load_profile(profile))
    return {role: graphs[role] for role in ("baseline", "patched")}


def graph_tensors(path: Path) -> tuple[list, list]:
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}

    def described(v):
        t = v.type.tensor_type
        return v.name, helper.tensor_dtype_to_np_dtype(t.elem_type), [d.dim_value for d in t.shape.dim]

    return ([described(v) for v in model.graph.input if v.name not in weights],
            [described(v) for v in model.graph.output])


def config_tensors(config) -> tuple[list, list]:
    data_type = type(config.input[0]).DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number

    def described(t):
        return t.name, np.dtype(TRITON_NUMPY[data_type[t.data_type].name]), list(t.dims)

    return [described(t) for t in config.input], [described(t) for t in config.output]


def test_the_repository_has_one_model_per_graph_and_a_readme(repo, tiny_export):
    path, report = repo
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["README.md", triton.MARK, "timm_vit_b16_baseline", "timm_vit_b16_patched"])
    graphs = engine_graphs(tiny_export, "ort-cpu")
    for role, graph in graphs.items():
        model = path / f"timm_vit_b16_{role}"
        assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == [
            "1/model.onnx", "config.pbtxt"]
        served = model / "1" / "model.onnx"
        assert os.path.samefile(served, graph) or served.read_bytes() == graph.read_bytes()
        assert report["models"][model.name]["graph"] == str(graph)
    assert graphs["patched"].name == "patched.fused.onnx"  # the graph ort-cpu runs, not the plain export
    assert not [p for p in path.parent.iterdir() if "staging" in p.name]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask  # a server running as another user can read it


def test_every_config_is_valid_for_tritons_schema_and_declares_the_graphs_tensors(repo, tiny_export, schema):
    path, _ = repo
    for role, graph in engine_graphs(tiny_export, "ort-cpu").items():
        config = parse((path / f"timm_vit_b16_{role}" / "config.pbtxt").read_text(), schema)
        assert config.name == f"timm_vit_b16_{role}"
        assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
        assert config_tensors(config) == graph_tensors(graph)
        # today's exports have a static batch of 1: full dims, no batcher (it needs max_batch_size > 0)
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert [g.kind for g in config.instance_group] == [schema.ModelInstanceGroup.KIND_CPU]
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_the_served_model_gives_the_exports_outputs(repo, tiny_export, schema):
    """ONNX Runtime on the repository's model.onnx, fed a tensor of the config's input dims, gives the export's
    graph's outputs, in the shapes the config declares."""
    path, _ = repo
    rng = np.random.default_rng(0)
    for role, graph in engine_graphs(tiny_export, "ort-cpu").items():
        model = path / f"timm_vit_b16_{role}"
        config = parse((model / "config.pbtxt").read_text(), schema)
        feed = {t.name: rng.standard_normal(list(t.dims)).astype(np.float32) for t in config.input}
        served = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        exported = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        got, want = served.run(None, feed), exported.run(None, feed)
        assert [o.name for o in served.get_outputs()] == [t.name for t in config.output]
        for g, w, t in zip(got, want, config.output):
            assert list(g.shape) == list(t.dims)
            np.testing.assert_array_equal(g, w)


def test_the_readme_says_how_to_serve_and_query_with_the_recipes_preprocessing(repo):
    path, _ = repo
    text = (path / "README.md").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{triton.TRITON_RELEASE}-py3" in text
    assert "tritonserver --model-repository=/models" in text and "--gpus" not in text  # a CPU profile
    assert f'-v "{path.resolve()}":/models' in text
    assert "H, W = 64, 64" in text and "Image.BICUBIC" in text  # timm_vit_b16's [preprocess]
    assert "MEAN = np.array([0.5, 0.5, 0.5]" in text and "STD = np.array([0.5, 0.5, 0.5]" in text
    assert 'InferInput("pixel_values", list(x.shape), "FP32")' in text
    assert 'client.infer("timm_vit_b16_patched"' in text and '"logits"' in text
    assert "max_batch_size: 0" in text and "dynamic batcher needs" in text
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "README.md", "exec")  # copy-pasteable: at least valid Python


@pytest.mark.parametrize("profile", PROFILES)
def test_every_bundled_profile_gives_valid_configs_for_its_device(profile, tiny_export, tmp_path, schema):
    """GPU profiles need no GPU here: the repository is for the server's machine."""
    report = write_repo(tiny_export, tmp_path / "repo", "--engine", profile)
    engine = load_profile(profile)
    graphs = engine_graphs(tiny_export, profile)  # the twins the profile runs, derived by the command
    want = schema.ModelInstanceGroup.KIND_GPU if engine.device == "gpu" else schema.ModelInstanceGroup.KIND_CPU
    for role, graph in graphs.items():
        model = tmp_path / "repo" / f"timm_vit_b16_{role}"
        config = parse((model / "config.pbtxt").read_text(), schema)
        assert [g.kind for g in config.instance_group] == [want]
        assert config_tensors(config) == graph_tensors(graph)
        assert (model / "1" / "model.onnx").read_bytes() == graph.read_bytes()
        accelerators = {a.name: dict(a.parameters) for a in config.optimization.execution_accelerators
                        .gpu_execution_accelerator}
        if engine.backend == "tensorrt" or "tensorrt" in engine.providers:
            # TensorRT engines are built by ONNX Runtime's TensorRT provider on the server, in the profile's precision
            assert accelerators["tensorrt"]["precision_mode"] == engine.precision.upper()
        if "cuda" in engine.provider_options:
            assert "device_id" not in accelerators["cuda"]  # the instance group's GPU
            assert accelerators["cuda"]["use_tf32"] == "0"
        assert report["models"][model.name]["graph"] == str(graph)


def test_profile_settings_map_to_the_backends_keys(schema):
    """Each profile key becomes what the onnxruntime backend reads: the graph level's numbers, intra-op threads, a
    CUDA-graph request told as a note since the backend has no such switch."""
    cpu = load_profile("ort-cpu")
    for level, number in (("basic", -1), ("extended", 1), ("disable", 2)):
        chosen = triton.settings(_replace(cpu, graph_optimization_level=level, threads=3))
        config = parse("\n".join(triton.pbtxt([("optimization", chosen.optimization)])), schema)
        assert config.optimization.graph.level == number
        assert chosen.parameters == {"intra_op_thread_count": "3"}
    assert not triton.settings(cpu).optimization  # "all" is the backend's default
    cuda = triton.settings(load_profile("ort-cuda"))
    assert cuda.kind == "KIND_GPU" and any("cuda_graph" in n for n in cuda.notes)
    with pytest.raises(UserError, match="no counterpart"):
        triton.settings(_replace(cpu, providers=("openvino",)))
    with pytest.raises(UserError, match="trt_bogus"):
        trt = load_profile("ort-trt")
        triton.settings(_replace(trt, provider_options={"tensorrt": {"trt_bogus": 1}}))


def _replace(profile, **changes):
    import dataclasses

    return dataclasses.replace(profile, **changes)


def dynamic_batch_graph(path: Path, output_batch: str | int = "batch") -> Path:
    """A graph built in code with a dynamic batch axis, as a dynamic-batch export will have."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [output_batch, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["heatmap"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_a_dynamic_batch_axis_becomes_tritons_with_the_dynamic_batcher(tmp_path, schema):
    graph = dynamic_batch_graph(tmp_path / "dyn.onnx")
    model = triton.served_model("m_patched", "patched", graph, load_profile("ort-cuda"), triton.check_max_batch(16))
    config = parse(model.config, schema)
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[3, 8, 8]] and [list(t.dims) for t in config.output] == [[3, 8, 8]]
    # where TensorRT builds the engine, its optimisation profile spans the batches Triton forms
    for profile in ("ort-trt", "trt-fp16"):
        config = parse(triton.served_model("m", "patched", graph, load_profile(profile), 16).config, schema)
        trt = dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
        assert (trt["trt_profile_min_shapes"], trt["trt_profile_opt_shapes"], trt["trt_profile_max_shapes"]) == (
            "pixel_values:1x3x8x8", "pixel_values:16x3x8x8", "pixel_values:16x3x8x8")
    assert triton.check_max_batch(None) == triton.DEFAULT_MAX_BATCH
    with pytest.raises(UserError, match="fixed first dim"):
        triton.served_model("m", "patched", dynamic_batch_graph(tmp_path / "bad.onnx", 1), load_profile("ort-cpu"), 8)


def run_graph(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})


def test_a_dynamic_batch_export_is_served_with_the_dynamic_batcher(dynamic_export, tmp_path, schema):
    """model.batch = "dynamic" (a first axis named batch): Triton owns that axis (max_batch_size = --max-batch,
    dims without it, the dynamic batcher), and the served model takes a batch of 3 as the export does."""
    done = hgdeploy_main("triton", *DYNAMIC, "--out", str(dynamic_export), "--repo", str(tmp_path / "repo"),
                         "--max-batch", "4")
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    for role, graph in engine_graphs(dynamic_export, "ort-cpu", "model.batch=dynamic").items():
        model = tmp_path / "repo" / f"timm_vit_b16_{role}"
        config = parse((model / "config.pbtxt").read_text(), schema)
        assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
        assert [list(t.dims) for t in config.input] == [[3, 64, 64]] and [list(t.dims) for t in config.output] == [[10]]
        got, want = run_graph(model / "1" / "model.onnx", x), run_graph(graph, x)
        assert got[0].shape == (3, 10)
        np.testing.assert_array_equal(got[0], want[0])
    assert "max_batch_size: 4" in (tmp_path / "repo" / "README.md").read_text()


def test_a_static_batch_export_keeps_its_batch_in_the_dims(tmp_path, schema):
    """model.batch = 2: a static batch Triton must not add to (max_batch_size 0); a request carries 2 images."""
    recipe = [*TINY_TIMM, "--set", "model.batch=2"]
    assert hgdeploy_main("export", *recipe, "--out", str(tmp_path / "export")).returncode == 0
    write = hgdeploy_main("triton", *recipe, "--out", str(tmp_path / "export"), "--repo", str(tmp_path / "repo"))
    assert write.returncode == 0, write.stderr
    config = parse((tmp_path / "repo" / "timm_vit_b16_patched" / "config.pbtxt").read_text(), schema)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[2, 3, 64, 64]] and [list(t.dims) for t in config.output] == [[2, 10]]
    text = (tmp_path / "repo" / "README.md").read_text()
    assert "exactly 2 images" in text and "np.stack([x.transpose(2, 0, 1)] * 2)" in text


def test_a_graph_with_external_data_brings_its_data_file(tiny_export, tmp_path):
    """A graph over 2 GB keeps its weights in <graph>.data, which the graph names: the repository keeps that name
    beside model.onnx, and ONNX Runtime loads model.onnx from there."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    for name in ("baseline.fused.onnx", "patched.fused.onnx"):
        model = onnx.load(str(export / name))
        onnx.save_model(model, str(export / name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
    write_repo(export, tmp_path / "repo")
    version = tmp_path / "repo" / "timm_vit_b16_patched" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "patched.fused.onnx.data"]
    feed = {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)}
    got = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    want = ort.InferenceSession(str(export / "patched.fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(got[0], want[0])


def test_a_previous_repository_is_replaced_whole(tiny_export, tmp_path):
    repo = tmp_path / "repo"
    write_repo(tiny_export, repo)
    (repo / "old_model" / "1").mkdir(parents=True)  # e.g. a model of an earlier recipe
    write_repo(tiny_export, repo)
    assert not (repo / "old_model").exists() and triton.is_repository(repo)
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_a_failure_while_writing_leaves_the_previous_repository(tiny_export, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_repo(tiny_export, repo)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(triton, "readme", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        hgdeploy_main("triton", *TINY_TIMM, "--out", str(tiny_export), "--repo", str(repo))
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def _non_triton_folder(tmp: Path) -> Path:
    (tmp / "repo").mkdir()
    (tmp / "repo" / "notes.txt").write_text("mine")
    return tmp / "repo"


BAD_INPUTS = {  # (arguments after the recipe, what the one line names); --repo is tmp/repo unless given
    "missing export": (lambda tmp, export: ["--out", str(tmp / "none")], "not found"),
    "unknown profile": (lambda tmp, export: ["--out", str(export), "--engine", "trt-nope"], "engine profile"),
    "a folder of other files": (lambda tmp, export: ["--out", str(export), "--repo", str(_non_triton_folder(tmp))],
                                "not a Triton repository"),
    "a file": (lambda tmp, export: ["--out", str(export), "--repo", str(tmp / "file.txt")], "is a file"),
    "inside the export": (lambda tmp, export: ["--out", str(export), "--repo", str(export / "triton")], "overlap"),
    "max batch 0": (lambda tmp, export: ["--out", str(export), "--max-batch", "0"], "--max-batch 0"),
    "max batch above a dynamic export's": (lambda tmp, export: ["--out", str(export), "--max-batch", "5000"],
                                           "from 1 to 1024"),
    "no --repo": (lambda tmp, export: ["--out", str(export)], "--repo"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_export, tmp_path):
    (tmp_path / "file.txt").write_text("a file")
    export_before = sorted(p.name for p in tiny_export.iterdir())
    make_args, needle = BAD_INPUTS[case]
    args = make_args(tmp_path, tiny_export)
    if "--repo" not in args and case != "no --repo":
        args += ["--repo", str(tmp_path / "repo")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = hgdeploy_main("triton", *TINY_TIMM, *args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("hgdeploy: error:") and needle in lines[0], done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.name for p in tiny_export.iterdir()) == export_before


def test_triton_has_help():
    done = hgdeploy_main("triton", "--help")
    assert done.returncode == 0 and "--repo" in done.stdout and "--max-batch" in done.stdout
