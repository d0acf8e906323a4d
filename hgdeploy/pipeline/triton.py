"""`hgdeploy triton`: a Triton Inference Server model repository from an export folder, without torch.

One model per graph the engine profile runs (baseline and patched): `<model>/1/model.onnx` (with the external-data
file a graph over 2 GB keeps beside it) and `<model>/config.pbtxt`, whose inputs, outputs, dims and data types are
read from the graph itself; the profile's settings become the ones Triton's onnxruntime backend really has (its
README and src/onnxruntime.cc are the reference for every key written here); `README.md` says how to start the
server and query it with the recipe's preprocessing. The repository is staged and renamed into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import onnx

from hgdeploy.backends import EngineProfile
from hgdeploy.core import progress
from hgdeploy.core.contract import graph_files
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject, check_output_folder, staged_folder, to_json, write_atomic
from hgdeploy.core.recipe import MAX_BATCH
from hgdeploy.graph.folder import ExportFolder

# The container the repository's README names; any release from MIN_TRITON_RELEASE on reads these configs (the
# `cuda` execution accelerator's parameters came in 24.06, graph level 2 = ORT_DISABLE_ALL in 24.01). 25.12 ships
# ONNX Runtime 1.23.2, inside the range hgdeploy's graphs are tested with (onnxruntime >= 1.19).
TRITON_RELEASE = "25.12"
MIN_TRITON_RELEASE = "24.06"
MARK = "hgdeploy-triton.json"  # what tells a repository this command wrote (and may replace) from any other folder
DEFAULT_MAX_BATCH = 8
SERVED_ROLES = ("baseline", "patched")
MODEL_FILE = "model.onnx"  # the onnxruntime backend's default_model_filename

TRITON_TYPES = {  # ONNX element type -> Triton data type (model_config.proto's DataType)
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
}
NUMPY_TYPES = {"TYPE_FP32": "np.float32", "TYPE_FP16": "np.float16", "TYPE_FP64": "np.float64"}
# The profile's graph_optimization_level as the backend's optimization.graph.level: no level is ORT_ENABLE_ALL,
# -1 ORT_ENABLE_BASIC, 1 ORT_ENABLE_EXTENDED, 2 ORT_DISABLE_ALL (src/onnxruntime.cc, ModelState).
GRAPH_LEVELS = {"all": None, "extended": 1, "basic": -1, "disable": 2}
# ONNX Runtime's TensorRT provider options under the names the backend's `tensorrt` accelerator takes; it refuses
# any other key. fp16 is its precision_mode, set from the profile's precision.
TRT_OPTIONS = {"trt_max_workspace_size": "max_workspace_size_bytes",
               "trt_int8_calibration_table_name": "int8_calibration_table_name",
               "trt_int8_use_native_calibration_table": "int8_use_native_calibration_table"} | {
    key: key for key in (
        "trt_max_partition_iterations", "trt_min_subgraph_size", "trt_dla_enable", "trt_dla_core",
        "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
        "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
        "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level",
        "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes",
        "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable")}
PROVIDERS = {"cpu": "cpu", "cpuexecutionprovider": "cpu", "cuda": "cuda", "cudaexecutionprovider": "cuda",
             "tensorrt": "tensorrt", "tensorrtexecutionprovider": "tensorrt"}


# ------------------------------------------------------------------------------------------ the text format


class Enum(str):
    """A protobuf enum value: written bare (KIND_GPU), where a string is quoted."""


@dataclass(frozen=True)
class Note:
    """A comment line in config.pbtxt: why a setting is (or is not) there, where a reader of the file looks."""

    text: str


Value: TypeAlias = "str | int | bool | Enum | tuple[int, ...] | Message"
Message: TypeAlias = "list[tuple[str, Value] | Note]"  # fields in order; a repeated field is its key given again


def pbtxt(message: Message, indent: int = 0) -> list[str]:
    """Protobuf text format, one field a line: what Triton's config.pbtxt is (ModelConfig of model_config.proto)."""
    pad, lines = "  " * indent, []
    for item in message:
        if isinstance(item, Note):
            lines.append(f"{pad}# {item.text}")
            continue
        key, value = item
        if isinstance(value, list):
            lines += [f"{pad}{key} {{", *pbtxt(value, indent + 1), f"{pad}}}"]
        else:
            lines.append(f"{pad}{key}: {scalar(value)}")
    return lines


def scalar(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Enum, int)):
        return str(value)
    if isinstance(value, tuple):
        return "[ " + ", ".join(str(v) for v in value) + " ]"
    return json.dumps(value, ensure_ascii=False)  # a quoted string with \" and \\ escaped, as text format wants


# ------------------------------------------------------------------------------------------ the graph's tensors


@dataclass(frozen=True)
class Tensor:
    """One input or output as Triton declares it: name, data type (TYPE_*) and dims, -1 where not fixed."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_json(self) -> JsonObject:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


@dataclass(frozen=True)
class GraphIO:
    """A graph's inputs (its weights left out) and outputs."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def batched(self) -> bool:
        """A dynamic-batch export: the first input's first dim is symbolic (a dim_param or unknown); Triton then
        owns that axis. Today's exports are static (batch 1)."""
        return bool(self.inputs and self.inputs[0].dims) and self.inputs[0].dims[0] == -1

    def without_batch(self) -> GraphIO:
        return GraphIO(tuple(replace(t, dims=t.dims[1:]) for t in self.inputs),
                       tuple(replace(t, dims=t.dims[1:]) for t in self.outputs))


def read_io(path: Path) -> GraphIO:
    """The graph's inputs and outputs, read from the ONNX file (its weights are not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return GraphIO(tuple(tensor(v, path) for v in model.graph.input if v.name not in weights),
                   tuple(tensor(v, path) for v in model.graph.output))


def tensor(value: onnx.ValueInfoProto, path: Path) -> Tensor:
    """A graph input or output as Triton declares it; UserError for what Triton has no declaration of."""
    t = value.type.tensor_type
    if not value.type.HasField("tensor_type") or t.elem_type not in TRITON_TYPES:
        raise UserError(f"{path}: {value.name} is not a tensor of a type Triton has (ONNX type "
                        f"{onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type else 'none'})")
    if not t.HasField("shape"):
        raise UserError(f"{path}: {value.name} has no shape; Triton needs its rank")
    return Tensor(value.name, TRITON_TYPES[t.elem_type],
                  tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim))


def batch_plan(io: GraphIO, path: Path, max_batch: int) -> tuple[int, GraphIO]:
    """Triton's max_batch_size and the tensors as it declares them. A dynamic batch axis becomes Triton's (dims
    without it, max_batch_size = max_batch); a static batch is part of the dims, with max_batch_size 0, since Triton
    would otherwise prepend a batch axis the graph does not have."""
    if not io.batched:
        return 0, io
    unbatched = [t.name for t in io.inputs + io.outputs if not t.dims or t.dims[0] != -1]
    if unbatched:
        raise UserError(f"{path}: its first input has a dynamic batch axis but {unbatched[0]} has a fixed first dim; "
                        "Triton batches every input and output along the first axis")
    return max_batch, io.without_batch()


def check_max_batch(requested: int | None) -> int:
    """--max-batch: the largest batch Triton's dynamic batcher forms (a dynamic-batch export only), within the
    batches a dynamic export takes (1 to core.recipe.MAX_BATCH)."""
    if requested is not None and not 1 <= requested <= MAX_BATCH:
        raise UserError(f"--max-batch {requested}: give a batch size from 1 to {MAX_BATCH} (the batches a "
                        "model.batch = \"dynamic\" export takes)")
    return DEFAULT_MAX_BATCH if requested is None else requested


def trt_batch_profile(io: GraphIO, max_batch: int) -> dict[str, str]:
    """ONNX Runtime's TensorRT optimisation profile for a batch axis Triton owns (`io` without it): 1 to max_batch
    images, tuned for max_batch, the batch the dynamic batcher fills under load. Without one the provider builds
    for the first batch it sees and rebuilds (minutes) whenever a larger one comes. None for other free dims."""
    if any(d < 1 for t in io.inputs for d in t.dims):
        return {}

    def shapes(batch: int) -> str:
        return ",".join(f"{t.name}:" + "x".join(str(d) for d in (batch, *t.dims)) for t in io.inputs)

    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(max_batch),
            "trt_profile_max_shapes": shapes(max_batch)}


# ------------------------------------------------------------------------------------------ the profile's settings


@dataclass(frozen=True)
class Settings:
    """What an engine profile becomes in config.pbtxt: instance kind, optimization block, model parameters, and
    one note per choice that needs its reason told (in the config and in the repository's README)."""

    kind: str
    optimization: Message = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def settings(engine: EngineProfile, trt_profile: dict[str, str] | None = None) -> Settings:
    """The profile's settings mapped onto Triton's onnxruntime backend, each to what it really has; `trt_profile`:
    the TensorRT provider's batch profile (trt_batch_profile) where it runs."""
    # KIND_GPU: an instance on each visible GPU, where the backend starts ONNX Runtime's CUDA provider (and the
    # accelerators below); KIND_CPU: the CPU provider only.
    kind = "KIND_GPU" if engine.on_gpu else "KIND_CPU"
    if engine.backend == "tensorrt":
        return tensorrt_settings(engine, kind, trt_profile or {})
    names = [provider(p, engine) for p in engine.providers]
    optimization: Message = []
    notes: list[str] = []
    level = GRAPH_LEVELS[engine.graph_optimization_level]
    if level is not None:
        optimization.append(("graph", [("level", level)]))
    else:
        notes.append("graph_optimization_level = all is the backend's default (ORT_ENABLE_ALL): no optimization.graph")
    gpu: Message = []
    if "tensorrt" in names:  # the backend always orders TensorRT, then CUDA, then the CPU, as the profiles do
        options = {"precision_mode": engine.precision.upper()} | trt_options(engine) | (trt_profile or {})
        gpu.append(("gpu_execution_accelerator", accelerator("tensorrt", options)))
    cuda = {k: option_text(v) for k, v in engine.provider_options.get("cuda", {}).items() if k != "device_id"}
    if cuda:  # device_id is the instance group's GPU: the backend sets it itself
        gpu.append(("gpu_execution_accelerator", accelerator("cuda", cuda)))
        notes.append("provider_options.cuda are the cuda accelerator's parameters (Triton 24.06 or newer); device_id "
                     "is left to the instance group")
    if gpu:
        optimization.append(("execution_accelerators", gpu))
    if engine.cuda_graph:
        notes.append("cuda_graph = true is not carried over: the onnxruntime backend has no CUDA-graph switch for "
                     "the CUDA provider (onnxruntime_backend issue 168; optimization.cuda.graphs is the TensorRT "
                     "backend's) and binds each request's own buffers, while a replayed graph needs fixed addresses")
    if engine.fused_attention:
        notes.append("fused_attention: the *.fused graphs are served; their com.microsoft MultiHeadAttention nodes "
                     "run on the backend's ONNX Runtime (CPU and CUDA providers)")
    parameters = {"intra_op_thread_count": str(engine.threads)} if engine.threads > 0 else {}
    if not parameters:
        notes.append("threads = 0: ONNX Runtime's default intra-op threads (one per core), no intra_op_thread_count")
    return Settings(kind, optimization, parameters, tuple(notes))


def tensorrt_settings(engine: EngineProfile, kind: str, trt_profile: dict[str, str]) -> Settings:
    """A TensorRT profile served through ONNX Runtime's TensorRT provider: Triton's tensorrt backend serves plan
    files, built for one GPU model and TensorRT version, which hgdeploy's machines cannot build; the provider builds
    the engine from model.onnx when the model loads and keeps it (trt_engine_cache_enable), as hgdeploy keeps its
    engines beside the graph."""
    options = {"precision_mode": engine.precision.upper(), "trt_engine_cache_enable": "1"} | trt_profile
    if engine.workspace_mb:
        options["max_workspace_size_bytes"] = str(engine.workspace_mb << 20)
    if engine.timing_cache:
        options["trt_timing_cache_enable"] = "1"
    note = (f"TensorRT profile {engine.name}: ONNX Runtime's TensorRT provider with precision_mode "
            f"{engine.precision.upper()} builds the engine from model.onnx at load (minutes the first time, then "
            "cached in the server's working directory); it builds weakly typed networks, so the graph's fp32 islands "
            "are TensorRT's to keep (hgdeploy's own TensorRT build is strongly typed)")
    gpu: Message = [("gpu_execution_accelerator", accelerator("tensorrt", options))]
    return Settings(kind, [("execution_accelerators", gpu)], {}, (note,))


def provider(name: str, engine: EngineProfile) -> str:
    """A profile provider as the backend knows it (cpu, cuda, tensorrt); UserError for one it has no way to run."""
    if name.lower() not in PROVIDERS:
        raise UserError(f"engine profile {engine.name}: provider {name!r} has no counterpart in Triton's onnxruntime "
                        "backend (it runs cpu, cuda and tensorrt)")
    return PROVIDERS[name.lower()]


def trt_options(engine: EngineProfile) -> dict[str, str]:
    """The profile's TensorRT provider options under the backend's names; an option it lacks is a UserError, not
    a setting silently dropped."""
    out = {}
    for key, value in engine.provider_options.get("tensorrt", {}).items():
        if key not in TRT_OPTIONS:
            raise UserError(f"engine profile {engine.name}: provider_options.tensorrt.{key} has no counterpart in "
                            "Triton's onnxruntime backend (its tensorrt accelerator's parameters)")
        out[TRT_OPTIONS[key]] = option_text(value)
    return out


def option_text(value: str | float | bool) -> str:
    """A provider option as the backend's string parameters take it (booleans as 1/0)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def accelerator(name: str, parameters: dict[str, str]) -> Message:
    return [("name", name), *(("parameters", [("key", k), ("value", v)]) for k, v in parameters.items())]


# ------------------------------------------------------------------------------------------ one model


@dataclass(frozen=True)
class ServedModel:
    """One model of the repository: its name, the export's graph it serves and its config."""

    name: str
    role: str
    graph: Path
    io: GraphIO  # as Triton declares it (without the batch axis when Triton owns it)
    max_batch_size: int
    config: str

    def to_json(self) -> JsonObject:
        return {"role": self.role, "graph": str(self.graph), "files": [p.name for p in graph_files(self.graph)],
                "max_batch_size": self.max_batch_size, "inputs": [t.to_json() for t in self.io.inputs],
                "outputs": [t.to_json() for t in self.io.outputs]}


def served_model(name: str, role: str, graph: Path, engine: EngineProfile, max_batch: int) -> ServedModel:
    max_batch_size, io = batch_plan(read_io(graph), graph, max_batch)
    chosen = settings(engine, trt_batch_profile(io, max_batch_size) if max_batch_size else None)
    return ServedModel(name, role, graph, io, max_batch_size,
                       model_config(name, io, max_batch_size, chosen, f"{graph.name}, profile {engine.name}"))


def model_config(name: str, io: GraphIO, max_batch_size: int, chosen: Settings, source: str) -> str:
    """config.pbtxt (Triton's ModelConfig in text format)."""
    batching = ("max_batch_size 0: a static batch, part of the dims; no dynamic_batching (Triton's dynamic batcher "
                "needs max_batch_size > 0)" if not max_batch_size else
                "a dynamic batch axis: Triton's, left out of the dims; its dynamic batcher groups requests")
    config: Message = [Note(f"{name}: {source} (written by hgdeploy triton)"),
                       ("name", name), ("platform", "onnxruntime_onnx"), ("backend", "onnxruntime"),
                       Note(batching), ("max_batch_size", max_batch_size)]
    config += [("input", tensor_message(t)) for t in io.inputs]
    config += [("output", tensor_message(t)) for t in io.outputs]
    if max_batch_size:
        config.append(("dynamic_batching", []))
    config.append(("instance_group", [("count", 1), ("kind", Enum(chosen.kind))]))
    config += [Note(n) for n in chosen.notes]
    if chosen.optimization:
        config.append(("optimization", chosen.optimization))
    config += [("parameters", [("key", k), ("value", [("string_value", v)])]) for k, v in chosen.parameters.items()]
    return "\n".join(pbtxt(config)) + "\n"


def tensor_message(t: Tensor) -> Message:
    return [("name", t.name), ("data_type", Enum(t.data_type)), ("dims", t.dims)]


# ------------------------------------------------------------------------------------------ the repository


def is_repository(path: Path) -> bool:
    """Did `hgdeploy triton` write this folder (so it may be replaced)?"""
    try:
        return json.loads((Path(path) / MARK).read_text()).get("tool") == "hgdeploy"
    except (OSError, ValueError, AttributeError):
        return False


def check_repository(repo: Path, export: Path) -> Path:
    """--repo, before any work: new, empty, or a repository this command wrote earlier (replaced whole), and
    neither inside the export nor holding it (replacing it would delete the graphs it serves)."""
    repo = check_output_folder(repo, "--repo")
    if repo.is_dir() and any(repo.iterdir()) and not is_repository(repo):
        raise UserError(f"--repo {repo} is a folder with other files in it, not a Triton repository hgdeploy wrote; "
                        "choose a new or empty folder")
    here, there = repo.resolve(), Path(export).resolve()
    if here == there or here.is_relative_to(there) or there.is_relative_to(here):
        raise UserError(f"--repo {repo} and the export {export} overlap; choose a --repo outside the export folder")
    return repo


@dataclass(frozen=True)
class TritonRepository:
    """What `hgdeploy triton` wrote: the repository, its models, the profile and release they are for."""

    path: Path
    engine: EngineProfile
    export: Path
    models: tuple[ServedModel, ...]
    notes: tuple[str, ...]

    def to_json(self) -> JsonObject:
        return {"tool": "hgdeploy", "repository": str(self.path), "export": str(self.export),
                "engine": self.engine.name, "device": self.engine.device, "triton_release": TRITON_RELEASE,
                "models": {m.name: m.to_json() for m in self.models}, "notes": list(self.notes)}


def write_repository(folder: ExportFolder, engine: EngineProfile, repo: Path, name: str,
                     max_batch: int | None = None) -> TritonRepository:
    """The Triton repository of the export's graphs that `engine` runs, at `repo` (checked by check_repository),
    written whole: a staging folder renamed into place. `name`: the models' prefix (the recipe's name)."""
    batch = check_max_batch(max_batch)
    graphs = {role: path for role, path in folder.engine_graphs(engine).items() if role in SERVED_ROLES}
    models = tuple(served_model(f"{name}_{role}", role, path, engine, batch) for role, path in graphs.items())
    if max_batch is not None and not any(m.max_batch_size for m in models):
        progress.info(f"note: --max-batch {max_batch} is not used: the graphs have a static batch (max_batch_size 0)")
    result = TritonRepository(Path(repo), engine, folder.path, models, settings(engine).notes)
    with staged_folder(repo) as staging:
        for model in models:
            link_or_copy(graph_files(model.graph), staging / model.name / "1")
            write_atomic(staging / model.name / "config.pbtxt", model.config)
        write_atomic(staging / "README.md", readme(result, folder.info.get("preprocess"), name))
        write_atomic(staging / MARK, to_json(result.to_json()))
    return result


def link_or_copy(files: list[Path], version: Path) -> None:
    """A graph (and its external data) into a model's version folder: the graph as model.onnx, the data file under
    its own name, which the graph names. Hard-linked where the file system allows (a ViT-H graph is gigabytes, and
    every hgdeploy writer replaces a graph file rather than writing into it, so the link never changes under
    Triton), else copied."""
    version.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(files):
        dst = version / (MODEL_FILE if i == 0 else src.name)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------ the README


def readme(repo: TritonRepository, preprocess: JsonObject | None, name: str) -> str:
    """How to start Triton on this repository and query it, copy-pasteable, with the recipe's preprocessing."""
    gpu = repo.engine.on_gpu
    rows = "\n".join(f"| `{m.name}` | `{m.graph.name}` | `{m.name}/1/{MODEL_FILE}` | {m.max_batch_size} | "
                     f"{settings(repo.engine).kind} |" for m in repo.models)
    docker = (f"docker run --rm{' --gpus all' if gpu else ''} -p 8000:8000 -p 8001:8001 -p 8002:8002 \\\n"
              f"  -v \"{repo.path.resolve()}\":/models nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3 \\\n"
              f"  tritonserver --model-repository=/models\n\n"
              "# in another shell: 200 once every model is loaded\n"
              "curl -s -o /dev/null -w \"%{http_code}\\n\" localhost:8000/v2/health/ready")
    model = repo.models[-1]
    notes = "\n".join(f"- {n}" for n in repo.notes)
    return f"""# Triton model repository: {name}

Written by `hgdeploy triton` from the export in `{repo.export}` for the engine profile `{repo.engine.name}`
({repo.engine.device}, {repo.engine.precision}). Each model is the graph that profile runs, served by Triton's
onnxruntime backend; `config.pbtxt` declares the inputs and outputs exactly as the graph has them.

| model | graph | served file | max_batch_size | instances |
|---|---|---|---:|---|
{rows}

## Start the server

```bash
{docker}
```

Triton answers on port 8000 (HTTP), 8001 (gRPC) and 8002 (metrics). Any Triton release from {MIN_TRITON_RELEASE} on
reads these configs; {TRITON_RELEASE} is the one named here.{gpu_line(gpu)}

## Query it

```bash
pip install "tritonclient[http]" numpy pillow
```

```python
{client_code(model, preprocess)}
```

`{repo.models[0].name}` is queried the same way: both models take the same input and give the same outputs.

{batching_text(model)}

## How the engine profile was carried over

{notes}
"""


def gpu_line(gpu: bool) -> str:
    return (" `--gpus all` needs the NVIDIA Container Toolkit; the instances run on every visible GPU (KIND_GPU)."
            if gpu else " The models run on the CPU (KIND_CPU); no GPU is needed.")


def client_code(model: ServedModel, preprocess: JsonObject | None) -> str:
    """A tritonclient query of `model` on one photo, preprocessed as the export was (hgdeploy's measure.images)."""
    image, outputs = model.io.inputs[0], model.io.outputs
    dtype = NUMPY_TYPES.get(image.data_type, "np.float32")
    if preprocess:
        (h, w), resample = preprocess["size"], "BICUBIC" if preprocess.get("resize") == "bicubic" else "BILINEAR"
        prep = (f"# the preprocessing this export was made with: resize to {h}x{w} ({resample.lower()}), [0, 1], "
                f"mean/std\nH, W = {h}, {w}\nMEAN = np.array({list(preprocess['mean'])}, np.float32)\n"
                f"STD = np.array({list(preprocess['std'])}, np.float32)\n\n"
                f"image = Image.open(\"photo.jpg\").convert(\"RGB\").resize((W, H), Image.{resample})\n"
                "x = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD")
    else:
        h, w = image.dims[-2:]
        prep = (f"# this export does not record its preprocessing (an older hgdeploy): export again to have it "
                f"here\nH, W = {h}, {w}\nimage = Image.open(\"photo.jpg\").convert(\"RGB\").resize((W, H))\n"
                "x = np.asarray(image, np.float32) / 255.0  # then normalise as the recipe's [preprocess] says")
    names = ", ".join(f'"{o.name}"' for o in outputs)
    return f"""import numpy as np
import tritonclient.http as httpclient
from PIL import Image

{prep}
{batch_line(static_batch(model), dtype)}

client = httpclient.InferenceServerClient("localhost:8000")
pixels = httpclient.InferInput("{image.name}", list(x.shape), "{image.data_type.removeprefix('TYPE_')}")
pixels.set_data_from_numpy(x)
wanted = [httpclient.InferRequestedOutput(name) for name in ({names},)]
result = client.infer("{model.name}", [pixels], outputs=wanted)
for name in ({names},):
    print(name, result.as_numpy(name).shape)"""


def batch_line(n: int, dtype: str) -> str:
    """The request's tensor from one photo: [1, 3, H, W], or the graph's static batch of n (the photo n times)."""
    if n == 1:
        return f"x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype={dtype})  # [1, 3, H, W]"
    return (f"x = np.ascontiguousarray(np.stack([x.transpose(2, 0, 1)] * {n}), dtype={dtype})  # [{n}, 3, H, W]: "
            f"the graphs' static batch, here one photo {n} times")


def batching_text(model: ServedModel) -> str:
    """What the configs' batching means to a client: how many images a request carries, and why."""
    if model.max_batch_size:
        return (f"The graphs have a dynamic batch axis: `max_batch_size: {model.max_batch_size}`, dims without the "
                "batch axis, and `dynamic_batching {}`, so Triton groups concurrent requests into batches of up to "
                f"{model.max_batch_size} images; one request may also carry up to {model.max_batch_size}, "
                "`[n, 3, H, W]`.")
    n = static_batch(model)
    images = "one image" if n == 1 else f"exactly {n} images (the query above sends one photo {n} times)"
    return (f"The graphs were exported with a static batch of {n}: `max_batch_size: 0` and dims that include the "
            f"batch axis, so every request carries {images}, `[{n}, 3, H, W]`, and there is no `dynamic_batching` "
            "(Triton's dynamic batcher needs `max_batch_size` > 0). Concurrent requests still run side by side on the "
            "model's instances (raise `count` in `instance_group` for more). An export with `--set "
            "model.batch=dynamic` gets `max_batch_size` (`hgdeploy triton --max-batch`, default 8) and "
            "`dynamic_batching {}`.")


def static_batch(model: ServedModel) -> int:
    """The images one request carries when the batch is the graph's own (max_batch_size 0): its first dim."""
    dims = model.io.inputs[0].dims if model.io.inputs else ()
    return dims[0] if not model.max_batch_size and dims and dims[0] > 0 else 1
