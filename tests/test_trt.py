"""GPU engine profiles: TensorRT through Polygraphy and ONNX Runtime's CUDA / TensorRT providers.

The profile checks, availability messages and pure helpers run everywhere. Building and running
TensorRT engines needs TensorRT and a CUDA GPU; those tests skip with the reason when either is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hgdeploy.backends import availability, backend_versions, load_profile, machine, make_runner
from hgdeploy.backends import trt as trt_backend
from hgdeploy.backends.machine import cuda_gpu_name
from hgdeploy.backends.onnxrt import lost_providers
from hgdeploy.backends.onnxrt import provider_name as ort_provider_name
from hgdeploy.backends.onnxrt import providers as ort_providers
from hgdeploy.backends.trt import engine_paths, manifest_mismatch, onnx_input_shapes, strongly_typed_flag
from hgdeploy.core.contract import FP32_MARKER, graph_sha256
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import file_sha256

ENGINES = Path(__file__).resolve().parents[1] / "engines"
GPU_PROFILES = {  # profile -> words one of which its "cannot run here" reason must contain
    "trt-fp32": ("TensorRT", "CUDA GPU"),
    "trt-fp16": ("TensorRT", "CUDA GPU"),
    "ort-cuda": ("CUDAExecutionProvider", "CUDA GPU"),
    "ort-cuda-fp16": ("CUDAExecutionProvider", "CUDA GPU"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDA GPU"),
}


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorrt_gpu() -> None:
    """Skip, with the reason, unless TensorRT imports and a CUDA GPU is visible."""
    if not _tensorrt_importable():
        pytest.skip("TensorRT not installed")
    if cuda_gpu_name() is None:
        pytest.skip("no CUDA GPU")


def tiny_onnx(path: Path, marked: bool = False) -> Path:
    """y = softmax(x @ W) with static shapes; `marked` puts FP32_MARKER in the softmax node's name."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("Softmax", ["h"], ["y"], axis=-1,
                              name=f"{FP32_MARKER}/softmax" if marked else "softmax")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _softmax_ref(x: np.ndarray, path: Path) -> np.ndarray:
    w = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    h = x @ w
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- profiles and availability (run everywhere) ----------------------------------------------------


def test_every_bundled_profile_loads():
    names = sorted(p.stem for p in ENGINES.glob("*.toml"))
    assert set(GPU_PROFILES) | {"ort-cpu"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.precision in ("fp32", "fp16")
    assert load_profile("trt-fp16").backend == "tensorrt" and load_profile("trt-fp16").cosine_min < 0.9999
    assert load_profile("trt-fp32").cosine_min >= 0.9999
    ort_trt = load_profile("ort-trt")
    assert ort_trt.providers[0] == "tensorrt" and ort_trt.provider_options["tensorrt"]["trt_engine_cache_enable"]
    assert ort_trt.provider_options["tensorrt"]["trt_engine_cache_path"].startswith("engines/build/")


@pytest.mark.parametrize("name", sorted(GPU_PROFILES))
def test_gpu_profile_names_what_is_missing_here(tmp_path, name):
    profile = load_profile(name)
    reason = availability(profile)
    if reason is None:
        pytest.skip(f"this machine can run {name}")
    assert any(word in reason for word in GPU_PROFILES[name]), reason
    with pytest.raises(UserError) as err:
        make_runner(tmp_path / "never-read.onnx", profile)
    message = str(err.value)
    assert "\n" not in message and name in message and reason in message
    with pytest.raises(UserError, match="cannot run here"):
        backend_versions(profile)


def test_missing_tensorrt_is_named_first():
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here")
    for name in ("trt-fp32", "trt-fp16"):
        assert availability(load_profile(name)) == "TensorRT is not installed (pip install 'hgdeploy[gpu]')"


def test_cpu_onnxruntime_on_a_gpu_machine_is_told_to_install_the_gpu_build(monkeypatch):
    import onnxruntime as ort

    from hgdeploy.backends import machine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA H100")  # a GPU machine with the CPU build
    reason = availability(load_profile("ort-cuda"))
    assert "has no CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason
    assert "has no TensorrtExecutionProvider" in availability(load_profile("ort-trt"))
    assert availability(load_profile("ort-cpu")) is None


def test_availability_order_for_tensorrt(monkeypatch):
    """Installed TensorRT is checked first, then the TensorRT major for fp16, then the GPU."""
    monkeypatch.setattr(machine, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: None)
    assert availability(load_profile("trt-fp32")) == machine.NO_GPU
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA L4")
    assert availability(load_profile("trt-fp16")) is None
    monkeypatch.setattr(machine, "tensorrt_version", lambda: "11.4.0")  # strongly typed: 11 builds fp16 too
    assert availability(load_profile("trt-fp16")) is None and availability(load_profile("trt-fp32")) is None


def test_networks_are_strongly_typed_on_every_tensorrt():
    """10.x needs the flag; 11 only builds strongly typed networks (Polygraphy's default there)."""
    assert strongly_typed_flag("10.3.0") is True and strongly_typed_flag("10.13.2") is True
    assert strongly_typed_flag("11.0.0") is None


def test_broken_tensorrt_install_is_named(monkeypatch):
    def broken():
        raise ImportError("libnvinfer.so.10: cannot open shared object file")

    monkeypatch.setattr(machine, "tensorrt_version", broken)
    assert availability(load_profile("trt-fp32")) == \
        "TensorRT is installed but does not import (libnvinfer.so.10: cannot open shared object file)"


def test_gpu_providers_without_a_gpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: None)
    assert availability(load_profile("ort-cuda")) == machine.NO_GPU
    assert availability(load_profile("ort-trt")) == machine.NO_GPU
    assert availability(load_profile("ort-cpu")) is None


def test_ort_tensorrt_provider_without_the_tensorrt_library(monkeypatch):
    """ONNX Runtime lists its TensorRT provider even where libnvinfer is missing; the profile must say so first."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA H100")
    monkeypatch.setattr(machine, "missing_tensorrt_library", lambda: "libnvinfer.so.10")
    reason = availability(load_profile("ort-trt"))
    assert reason is not None and "libnvinfer.so.10 does not load" in reason
    assert availability(load_profile("ort-cuda")) is None  # the CUDA provider needs no TensorRT
    with pytest.raises(UserError, match="libnvinfer.so.10"):
        make_runner(Path("never-read.onnx"), load_profile("ort-trt"))


def test_gpu_name_lookup_here():
    """The driver lookup answers without raising; None on a machine without libcuda or a device."""
    name = cuda_gpu_name()
    assert name is None or (isinstance(name, str) and name)


@pytest.mark.parametrize("text,needle", [
    ('[engine]\nbackend = "tensorrt"\nprecision = "int8"\n', "engine.precision must be one of fp32, fp16"),
    ('[engine]\nbackend = "tensorrt"\nproviders = ["cuda"]\n', "engine.providers applies to backend onnxruntime"),
    ('[engine]\nbackend = "onnxruntime"\nworkspace_mb = 512\n', "engine.workspace_mb applies to backend tensorrt"),
    ('[engine]\nbackend = "tensorrt"\ntiming_cache = "yes"\n', "engine.timing_cache = 'yes' has the wrong type"),
    ('[engine]\nbackend = "tensorrt"\nworkspace_mb = true\n', "engine.workspace_mb = True has the wrong type"),
    ('[engine]\nbackend = "tensorrt"\nworkspace_mb = -1\n', "engine.workspace_mb must be >= 0"),
    ('[engine]\nbackend = "onnxruntime"\ndevice = "cpu"\nproviders = ["cuda", "cpu"]\n',
     "engine.device = \"cpu\" but engine.providers lists 'cuda'"),
    ('[engine]\nbackend = "onnxruntime"\ndevice = "gpu"\nproviders = ["cpu"]\n', "needs a GPU provider"),
    ('[engine]\nbackend = "tensorrt"\ndevice = "cpu"\n', "backend tensorrt runs on the GPU"),
    ('[engine]\nbackend = "onnxruntime"\ndevice = "tpu"\n', "engine.device must be one of cpu, gpu"),
    ('[engine]\nbackend = "onnxruntime"\ncuda_graph = true\n', "engine.cuda_graph needs the \"cuda\" provider"),
    ('[engine]\nbackend = "tensorrt"\ncuda_graph = true\n', "engine.cuda_graph applies to backend onnxruntime"),
    ('[engine]\nbackend = "onnxruntime"\nproviders = ["cuda"]\n[engine.provider_options.cuda]\nenable_cuda_graph = 1\n',
     "set engine.cuda_graph = true instead"),
    ('[engine]\nbackend = "onnxruntime"\nproviders = ["cpu"]\n[engine.provider_options.cuda]\ndevice_id = 0\n',
     "provider_options.cuda is for a provider not in engine.providers"),
    (('[engine]\nbackend = "onnxruntime"\nproviders = ["tensorrt"]\n[engine.provider_options.tensorrt]\n'
      'trt_fp16_enable = true\n'), "set engine.precision = \"fp16\" instead"),
    ('[engine]\nbackend = "onnxruntime"\nproviders = ["cuda"]\n[engine.provider_options.cuda]\nx = [1]\n',
     "must be a string, number or boolean"),
])
def test_bad_gpu_profiles_are_named(tmp_path, text, needle):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_profile(str(path))


def test_tensorrt_profile_accepts_its_keys(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[engine]\nbackend = "tensorrt"\nprecision = "fp16"\nworkspace_mb = 2048\ntiming_cache = false\n'
                    'batch_range = [2, 4, 16]\n')
    profile = load_profile(str(path))
    assert (profile.workspace_mb, profile.timing_cache, profile.precision) == (2048, False, "fp16")
    assert profile.to_dict() == {"name": "t", "backend": "tensorrt", "device": "gpu", "precision": "fp16",
                                 "workspace_mb": 2048, "timing_cache": False, "batch_range": [2, 4, 16]}


# --- ONNX Runtime provider helpers (pure) ----------------------------------------------------------


def test_ort_provider_names_are_exact_for_known_names():
    available = ["NvTensorRTRTXExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider",
                 "CPUExecutionProvider"]
    assert ort_provider_name("tensorrt", available) == "TensorrtExecutionProvider"
    assert ort_provider_name("cuda", available) == "CUDAExecutionProvider"
    assert ort_provider_name("CPUExecutionProvider", available) == "CPUExecutionProvider"
    assert ort_provider_name("rtx", available) == "NvTensorRTRTXExecutionProvider"
    assert ort_provider_name("tensorrt", ["CPUExecutionProvider"]) is None
    assert ort_provider_name("execution", available) is None  # ambiguous


def test_ort_trt_profile_becomes_provider_options():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = ort_providers(load_profile("ort-trt"), available)
    assert [name for name, _ in providers] == available
    trt_options = providers[0][1]
    assert trt_options["trt_fp16_enable"] is True and trt_options["trt_engine_cache_enable"] is True
    assert trt_options["trt_engine_cache_path"] == "engines/build/ort-trt"
    cuda = ort_providers(load_profile("ort-cuda"), available)
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": False,
                                                 "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": True})
    assert cuda[1] == ("CPUExecutionProvider", {})


def test_lost_providers_are_named():
    assert lost_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider"]
    assert lost_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"]) == []


# --- TensorRT helpers (pure, run everywhere) -------------------------------------------------------


HERE = {"tensorrt": "10.3.0", "gpu": "NVIDIA A100-SXM4-40GB", "source_sha256": "ab" * 32, "precision": "fp16"}


def test_manifest_matches_this_machine():
    assert manifest_mismatch(dict(HERE, engine_sha256="cd" * 32), dict(HERE, engine_sha256="cd" * 32)) is None
    assert manifest_mismatch(dict(HERE), dict(HERE)) is None


@pytest.mark.parametrize("change,needle", [
    ({"tensorrt": "10.5.0", "gpu": "NVIDIA L4"},
     "engine was built with TensorRT 10.3.0 on NVIDIA A100-SXM4-40GB, this machine has TensorRT 10.5.0 on NVIDIA L4"),
    ({"gpu": None}, "this machine has TensorRT 10.3.0 on None"),
    ({"source_sha256": "ef" * 32}, "the ONNX file now has efefefefefef"),
    ({"precision": "fp32"}, "engine was built at fp16, the profile asks for fp32"),
    ({"engine_sha256": "00" * 32}, "does not match its manifest's sha256"),
])
def test_manifest_mismatch_names_the_difference(change, needle):
    message = manifest_mismatch(dict(HERE, engine_sha256="cd" * 32), dict(HERE, **change))
    assert message is not None and needle in message and "\n" not in message


def test_engine_files_are_named_after_model_and_profile(tmp_path):
    paths = engine_paths(tmp_path / "patched.onnx", "trt-fp16", tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {"engine": "patched.trt-fp16.engine",
                                                     "timing_cache": "patched.trt-fp16.timing.cache",
                                                     "manifest": "patched.trt-fp16.manifest.json"}
    assert all(p.parent == tmp_path / "out" for p in paths.values())


def test_engine_problem_without_engine_or_manifest(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    profile = load_profile("trt-fp32")
    engine = engine_paths(onnx_path, profile.name, tmp_path)["engine"]
    assert "has not been built" in trt_backend.engine_problem(engine, onnx_path, profile)
    engine.write_bytes(b"not an engine")
    assert "manifest.json is missing" in trt_backend.engine_problem(engine, onnx_path, profile)


def _fake_build(tmp_path, profile, **manifest):
    """An ONNX file plus an engine file and manifest as build_trt_engine writes them (no TensorRT needed)."""
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    paths = engine_paths(onnx_path, profile.name, tmp_path)
    paths["engine"].write_bytes(b"serialized engine")
    fields = {"tensorrt": "10.3.0", "gpu": "NVIDIA L4", "precision": profile.precision,
              "source_sha256": file_sha256(onnx_path), "engine_sha256": file_sha256(paths["engine"])}
    paths["manifest"].write_text(json.dumps(fields | manifest))
    return onnx_path, paths


def test_an_engine_is_stale_when_only_the_external_weights_of_its_graph_change(tmp_path, monkeypatch):
    """Over 2 GB a graph keeps its weights in `<graph>.data`: a new checkpoint of a ViT-H rewrites only that
    file, and an engine built from the old weights must not be reused for it."""
    profile = load_profile("trt-fp32")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(onnx_path))
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    paths = engine_paths(onnx_path, profile.name, tmp_path)
    paths["engine"].write_bytes(b"serialized engine")
    monkeypatch.setattr(machine, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA L4")
    paths["manifest"].write_text(json.dumps(
        {"tensorrt": "10.3.0", "gpu": "NVIDIA L4", "precision": profile.precision,
         "source_sha256": graph_sha256(onnx_path), "engine_sha256": file_sha256(paths["engine"])}))
    graph_bytes = onnx_path.read_bytes()
    assert trt_backend.engine_problem(paths["engine"], onnx_path, profile) is None
    data = tmp_path / "m.onnx.data"
    data.write_bytes(np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32).tobytes())  # new weights
    assert onnx_path.read_bytes() == graph_bytes  # the graph file itself is unchanged
    assert "the ONNX file now has" in trt_backend.engine_problem(paths["engine"], onnx_path, profile)


def test_load_trt_engine_checks_the_manifest_against_this_machine(tmp_path, monkeypatch):
    profile = load_profile("trt-fp32")
    onnx_path, paths = _fake_build(tmp_path, profile)
    monkeypatch.setattr(machine, "tensorrt_version", lambda: "10.5.0")
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA A100-SXM4-40GB")
    with pytest.raises(UserError, match="engine was built with TensorRT 10.3.0 on NVIDIA L4, this machine has "
                                        "TensorRT 10.5.0 on NVIDIA A100-SXM4-40GB"):
        trt_backend.load_trt_engine(paths["engine"], onnx_path, profile)
    monkeypatch.setattr(machine, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(machine, "cuda_gpu_name", lambda: "NVIDIA L4")
    loader = trt_backend.load_trt_engine(paths["engine"], onnx_path, profile)  # not called: that needs TensorRT
    assert type(loader).__name__ == "EngineFromBytes"
    paths["engine"].write_bytes(b"another build")
    assert "does not match its manifest's sha256" in trt_backend.engine_problem(paths["engine"], onnx_path, profile)
    tiny_onnx(onnx_path, marked=True)  # re-exported: the source changed
    assert "(re-exported?)" in trt_backend.engine_problem(paths["engine"], onnx_path, profile)
    paths["manifest"].write_text("{not json")
    assert "cannot read m.trt-fp32.manifest.json" in trt_backend.engine_problem(paths["engine"], onnx_path, profile)


def test_backend_versions_for_cpu_onnxruntime():
    versions = backend_versions(load_profile("ort-cpu"))
    assert {"onnxruntime", "polygraphy"} <= versions.keys() and "gpu" not in versions


def _relu_onnx(path, dims):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_input_shapes_give_the_optimisation_profile(tmp_path):
    """A static graph is built for its shape; a batch axis ("batch" first, model.batch = "dynamic") for the
    profile's batch_range; any other dynamic dimension is refused."""
    assert onnx_input_shapes(tiny_onnx(tmp_path / "m.onnx")) == {"x": [[2, 8]] * 3}
    assert onnx_input_shapes(tiny_onnx(tmp_path / "m.onnx"), (1, 8, 32)) == {"x": [[2, 8]] * 3}
    batched = _relu_onnx(tmp_path / "b.onnx", ["batch", 8])
    assert onnx_input_shapes(batched, (1, 8, 32)) == {"x": [[1, 8], [8, 8], [32, 8]]}
    with pytest.raises(UserError, match="input x has a dynamic dimension other than a batch axis"):
        onnx_input_shapes(_relu_onnx(tmp_path / "dyn.onnx", ["n", 8]))
    with pytest.raises(UserError, match="input x has a dynamic dimension other than a batch axis"):
        onnx_input_shapes(_relu_onnx(tmp_path / "dyn2.onnx", ["batch", "m"]))


@pytest.mark.parametrize("value", ["[8, 1, 32]", "[1, 8]", "[0, 1, 2]"])
def test_a_bad_batch_range_is_refused(tmp_path, value):
    path = tmp_path / "t.toml"
    path.write_text(f'[engine]\nbackend = "tensorrt"\nprecision = "fp16"\nbatch_range = {value}\n')
    with pytest.raises(UserError, match="engine.batch_range must be \\[min, opt, max\\]"):
        load_profile(str(path))


def _feed(i: int, contiguous: bool = True) -> np.ndarray:
    """The i-th input, a new array each call; or a non-contiguous view (eval's sliding windows pass those)."""
    return np.full((2, 8), 0.1 * i, np.float32) if contiguous else np.full((2, 16), 0.1 * i, np.float32)[:, ::2]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_device_resident_runner_copies_every_feed_into_its_fixed_buffers(tmp_path, cuda_graph):
    """The GPU runner's binding code, run on ONNX Runtime's CPU device: every feed reaches the engine (an
    id-keyed upload cache served the previous array's data to a new one with the same id), outputs stay
    bound unless asked for, a feed of another shape is refused in one line."""
    import onnxruntime as ort

    from hgdeploy.backends.onnxrt import DeviceResidentRunner

    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    runner = DeviceResidentRunner(lambda: ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
                                  "t", cuda_graph=cuda_graph, device="cpu")
    with runner:
        for i in range(8):  # each feed made in the call and dropped after it: CPython gives the next one its id
            np.testing.assert_allclose(runner.infer({"x": _feed(i)})["y"], _softmax_ref(_feed(i), onnx_path),
                                       rtol=1e-5, atol=1e-6)
        view = runner.infer({"x": _feed(9, contiguous=False)})["y"]
        np.testing.assert_allclose(view, _softmax_ref(_feed(9), onnx_path), rtol=1e-5, atol=1e-6)
        assert runner.infer({"x": np.zeros((2, 8), np.float32)}, copy_outputs_to_host=False) == {}
        assert runner.last_inference_time() > 0
        with pytest.raises(UserError, match=r"input x has shape \(2, 4\), the graph's is \(2, 8\)"):
            runner.infer({"x": np.zeros((2, 4), np.float32)}, check_inputs=False)


def test_the_device_resident_runner_takes_an_output_of_unknown_shape_only_without_a_cuda_graph(tmp_path):
    """An output ONNX Runtime cannot size before the run (here NonZero's) is bound for ORT to allocate; a CUDA
    graph, which replays on fixed buffers, refuses it in one line."""
    import onnxruntime as ort

    from hgdeploy.backends.onnxrt import DeviceResidentRunner

    model = onnx.load(str(tiny_onnx(tmp_path / "m.onnx")))
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    model.graph.initializer.append(zero)
    model.graph.node.extend([helper.make_node("Greater", ["x", "zero"], ["positive"]),
                             helper.make_node("NonZero", ["positive"], ["where"])])
    model.graph.output.append(helper.make_tensor_value_info("where", TensorProto.INT64, None))
    onnx.save(model, str(tmp_path / "nonzero.onnx"))

    def load():
        return ort.InferenceSession(str(tmp_path / "nonzero.onnx"), providers=["CPUExecutionProvider"])

    x = np.where(np.arange(16).reshape(2, 8) % 3 == 0, 1.0, -1.0).astype(np.float32)
    with DeviceResidentRunner(load, "t", cuda_graph=False, device="cpu") as runner:
        out = runner.infer({"x": x})
    np.testing.assert_allclose(out["y"], _softmax_ref(x, tmp_path / "m.onnx"), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["where"], np.stack(np.nonzero(x > 0)))
    with pytest.raises(UserError, match=r"where has shape .*: device buffers \(and CUDA graphs\) need"):
        DeviceResidentRunner(load, "t", cuda_graph=True, device="cpu").activate()


def test_the_tensorrt_runner_copies_every_feed_into_its_device_buffers(monkeypatch, capsys):
    """device_feed_trt_runner's buffers through Polygraphy's own infer path, with its DeviceArray holding host
    memory instead of CUDA memory (its constructor and dtype handling stay Polygraphy's) and TensorRT's
    engine (activation, execution) replaced by reading the buffers back: each feed must arrive, whatever its
    layout or id, and Polygraphy must not warn about how it was called."""
    from polygraphy import cuda
    from polygraphy.backend.trt import TrtRunner

    class HostArray(cuda.DeviceArray):
        def resize(self, shape):
            self.host, self.shape = np.zeros(int(np.prod(shape)) * self.itemsize, np.uint8), shape
            return self

        def copy_from(self, host_buffer, stream=None):
            assert host_buffer.flags["C_CONTIGUOUS"]
            self.host[:] = host_buffer.view(np.uint8).ravel()
            return self

        def free(self):
            self.freed = True

    def execute(self, feed_dict, copy_outputs_to_host, return_raw_buffers):
        assert all(isinstance(v, HostArray) for v in feed_dict.values())
        return {k: v.host.view(np.float32).reshape(v.shape).copy() for k, v in feed_dict.items()}

    monkeypatch.setattr(cuda, "DeviceArray", HostArray)
    monkeypatch.setattr(TrtRunner, "activate_impl", lambda self: None)
    monkeypatch.setattr(TrtRunner, "deactivate_impl", lambda self: None)
    monkeypatch.setattr(TrtRunner, "_infer_impl", execute)
    runner = trt_backend.device_feed_trt_runner(engine=None, name="t")
    with runner:
        for i in range(8):  # each feed made in the call and dropped after it: CPython gives the next one its id
            np.testing.assert_array_equal(runner.infer({"x": _feed(i)}, check_inputs=False)["x"], _feed(i))
        np.testing.assert_array_equal(runner.infer({"x": _feed(9, contiguous=False)}, False)["x"], _feed(9))
        first = runner._device_inputs["x"][1]
        runner.infer({"x": np.ones((3, 8), np.float32)}, False)  # another shape: a new buffer, the old one freed
        assert first.freed and runner._device_inputs["x"][1].shape == (3, 8)
        last = runner._device_inputs["x"][1]
    assert last.freed  # deactivate frees the buffers
    assert "not recommended" not in capsys.readouterr().out


# --- TensorRT build, run and manifest (need TensorRT and a CUDA GPU) -------------------------------


def test_trt_fp32_builds_runs_and_reuses_its_engine(tmp_path):
    require_tensorrt_gpu()
    import tensorrt as trt

    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    profile = load_profile("trt-fp32")
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    with make_runner(onnx_path, profile) as runner:
        y = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(y, _softmax_ref(x, onnx_path), rtol=1e-4, atol=1e-5)
    paths = engine_paths(onnx_path, profile.name, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["tensorrt"] == trt.__version__ and manifest["gpu"] == cuda_gpu_name()
    assert manifest["inputs"] == {"x": [2, 8]} and manifest["precision"] == "fp32"
    assert manifest["source_sha256"] == file_sha256(onnx_path)
    built = paths["engine"].stat().st_mtime_ns
    with make_runner(onnx_path, profile) as runner:
        runner.infer({"x": x})
    assert paths["engine"].stat().st_mtime_ns == built  # matching engine reused, not rebuilt


def test_trt_manifest_mismatch_is_a_user_error(tmp_path):
    require_tensorrt_gpu()
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    profile = load_profile("trt-fp32")
    engine = trt_backend.build_trt_engine(onnx_path, profile, tmp_path)
    manifest_path = engine_paths(onnx_path, profile.name, tmp_path)["manifest"]
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"tensorrt": "9.0.0", "gpu": "NVIDIA Imaginary"}))
    with pytest.raises(UserError, match="engine was built with TensorRT 9.0.0 on NVIDIA Imaginary, this machine has"):
        trt_backend.load_trt_engine(engine, onnx_path, profile)


def test_trt_fp16_builds_a_strongly_typed_engine_from_the_fp16_graph(tmp_path):
    require_tensorrt_gpu()
    from hgdeploy.graph.fp16 import to_fp16

    fp32_path = tiny_onnx(tmp_path / "m.onnx", marked=True)
    converted, _ = to_fp16(onnx.load(str(fp32_path)), lambda n: n.name.startswith(FP32_MARKER))
    path = tmp_path / "m.fp16.onnx"
    onnx.save(converted, str(path))
    profile = load_profile("trt-fp16")
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    with make_runner(path, profile) as runner:
        y = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(y, _softmax_ref(x, fp32_path), atol=5e-3)
    manifest = json.loads(engine_paths(path, profile.name, tmp_path)["manifest"].read_text())
    assert manifest["precision"] == "fp16" and manifest["strongly_typed"] is True
