"""ONNX Runtime (CPU, CUDA and TensorRT execution providers) through Polygraphy's OnnxrtRunner."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from polygraphy.backend.base import BaseRunner

from hgdeploy.backends import machine
from hgdeploy.backends.base import Backend
from hgdeploy.backends.profile import ORT_OPT_LEVELS, EngineProfile, ProviderOptions
from hgdeploy.core.contract import EXTERNAL_DATA_BYTES
from hgdeploy.core.errors import UserError

if TYPE_CHECKING:  # onnxruntime is imported where a session is made
    import onnxruntime as ort

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# TensorRT EP options naming cache folders: created before the session so ORT can write there.
CACHE_DIR_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")
QUIET = 3  # ONNX Runtime log severity: 3 = errors only; a provider that fails to start is still caught below
# A CPU session of a graph with this many bytes of weights (or more) runs lean: without ONNX Runtime's own constant
# folding and without its CPU memory arena. Measured on SwinV2-L at 544 px (0.9 GB graph, 2 cores): folding took
# session creation to a 14.2 GB peak (it materialises every block's [heads, 1024, 1024] position bias) and the
# arena kept 4.7 GB of activations per idle session; lean, a session holds 1.4 GB and a run peaks at 3.9 GB, no
# slower (10 s a run either way). Our own passes fold the patched graph up to FOLD_MAX_BYTES a result; on the default
# model (88 MB, under the line) ORT's folding made no difference (564 vs 570 ms baseline, 509 vs 493 ms patched).
# The line is the exports' external-data line (core.contract.EXTERNAL_DATA_BYTES): the models whose graphs count in
# GB are kept on disk by the export, run lean here and have `run`'s steps in processes of their own.
LEAN_GRAPH_BYTES = EXTERNAL_DATA_BYTES
GPU_HINT = "replace onnxruntime with onnxruntime-gpu: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def check(profile: EngineProfile) -> None:
    """provider_options tables must belong to listed providers; fp16 is the TensorRT EP's switch."""
    where = profile.path
    for prov, opts in profile.provider_options.items():
        if prov not in profile.providers:
            raise UserError(f"{where}: engine.provider_options.{prov} is for a provider not in engine.providers "
                            f"({', '.join(profile.providers)})")
        if not isinstance(opts, dict):
            raise UserError(f"{where}: engine.provider_options.{prov} must be a table of option = value")
        for key, value in opts.items():
            if not isinstance(value, (str, int, float, bool)):
                raise UserError(f"{where}: engine.provider_options.{prov}.{key} = {value!r} must be a string, "
                                "number or boolean")
        if "trt_fp16_enable" in opts:
            raise UserError(f"{where}: set engine.precision = \"fp16\" instead of "
                            f"engine.provider_options.{prov}.trt_fp16_enable (one switch, not two)")
        if "enable_cuda_graph" in opts:
            raise UserError(f"{where}: set engine.cuda_graph = true instead of "
                            f"engine.provider_options.{prov}.enable_cuda_graph (one switch, not two)")


def provider_name(short: str, available: Iterable[str]) -> str | None:
    """The ONNX Runtime provider a profile name means ("cuda" -> CUDAExecutionProvider), if available.

    Known short names map exactly (a substring match would let "tensorrt" pick a TensorRT-RTX
    provider); other names must match exactly one available provider.
    """
    available = list(available)
    if short in available:
        return short
    if short.lower() in PROVIDER_NAMES:
        name = PROVIDER_NAMES[short.lower()]
        return name if name in available else None
    matches = [a for a in available if short.lower() in a.lower()]
    return matches[0] if len(matches) == 1 else None


def available(profile: EngineProfile) -> str | None:
    """Why this onnxruntime cannot run the profile (a provider it lacks, no GPU for a GPU provider), or None."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    gpu_wanted = any(PROVIDER_NAMES.get(short.lower()) in GPU_PROVIDERS for short in profile.providers)
    if gpu_wanted and machine.cuda_gpu_name() is None:  # before any advice to install a GPU build: none would help
        return machine.NO_GPU
    for short in profile.providers:
        if provider_name(short, have) is None:
            wanted = PROVIDER_NAMES.get(short.lower(), f"provider matching {short!r}")
            hint = f"; {GPU_HINT}" if wanted in GPU_PROVIDERS else ""
            return (f"engine.providers asks for {short!r}, but onnxruntime {ort.__version__} has no {wanted} "
                    f"(it has {', '.join(have)}){hint}")
    if uses_gpu(profile, have) and machine.cuda_gpu_name() is None:
        return machine.NO_GPU
    if "tensorrt" in profile.providers:
        lib = machine.missing_tensorrt_library()
        if lib is not None:
            return (f"TensorRT's library {lib} does not load (not installed, or not on LD_LIBRARY_PATH); ONNX Runtime "
                    f"lists its TensorRT provider but cannot start it without it ({machine.GPU_INSTALL_HINT})")
    return None


def uses_gpu(profile: EngineProfile, have: Iterable[str]) -> bool:
    have = list(have)
    return any(provider_name(p, have) in GPU_PROVIDERS for p in profile.providers)


def providers(profile: EngineProfile, have: Iterable[str]) -> list[tuple[str, ProviderOptions]]:
    """(provider, options) pairs for InferenceSession, in the profile's priority order."""
    have = list(have)
    out = []
    for short in profile.providers:
        name = provider_name(short, have)
        if name is None:
            raise UserError(f"engine profile {profile.name}: onnxruntime has no provider for {short!r}")
        options = dict(profile.provider_options.get(short, {}))
        if name == "TensorrtExecutionProvider" and profile.precision == "fp16":
            options["trt_fp16_enable"] = True  # the graph is fp16 already; this lets TensorRT pick fp16 kernels
        if name == "CUDAExecutionProvider" and profile.cuda_graph:
            options["enable_cuda_graph"] = True
        out.append((name, options))
    return out


def lost_providers(requested: Iterable[str], active: Iterable[str]) -> list[str]:
    """Providers ONNX Runtime was asked for but did not start (it falls back to CPU with a warning)."""
    active = set(active)
    return [name for name in requested if name not in active]


def runner(onnx_path: Path, profile: EngineProfile, profiling: Path | None = None) -> BaseRunner:
    """An ONNX Runtime runner (session built lazily on activate): Polygraphy's on the CPU, a
    device-resident one on the GPU. profiling: ORT's profiler on, its trace written under this file prefix
    (`end_profiling` closes it; profiling slows every run, so timed runners never have it)."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    chosen = providers(profile, ort.get_available_providers())
    name = f"{profile.name}:{Path(onnx_path).stem}"
    session = _session_loader(onnx_path, profile, chosen, profiling)
    return DeviceResidentRunner(session, name, profile.cuda_graph) if profile.on_gpu else OnnxrtRunner(session, name=name)


def end_profiling(runner: BaseRunner) -> Path:
    """The trace of an active runner built with `profiling`: ORT stops recording and writes the JSON file."""
    return Path(runner.sess.end_profiling())


def graph_bytes(onnx_path: Path) -> int:
    """Bytes of a graph file and of the external-data files beside it (its weights, near enough)."""
    path = Path(onnx_path)
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


def lean_session(onnx_path: Path, chosen: list[tuple[str, ProviderOptions]]) -> bool:
    """A large graph on the CPU provider alone: no ORT constant folding, no CPU arena (LEAN_GRAPH_BYTES says why)."""
    return all(name == "CPUExecutionProvider" for name, _ in chosen) and graph_bytes(onnx_path) >= LEAN_GRAPH_BYTES


def _session_loader(onnx_path: Path, profile: EngineProfile, chosen: list[tuple[str, ProviderOptions]],
                    profiling: Path | None = None) -> Any:
    """A callable that builds the InferenceSession (and refuses one that lost a requested provider)."""
    import onnxruntime as ort

    def session() -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = QUIET  # graph-optimizer notes ("cannot remove node") are not for users
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                   ORT_OPT_LEVELS[profile.graph_optimization_level])
        if profile.threads:
            options.intra_op_num_threads = profile.threads
        if profiling is not None:  # ORT writes the trace there but makes no folder
            Path(profiling).parent.mkdir(parents=True, exist_ok=True)
            options.enable_profiling, options.profile_file_prefix = True, str(profiling)
        for _, opts in chosen:
            for key in CACHE_DIR_OPTIONS:
                if key in opts:
                    Path(str(opts[key])).mkdir(parents=True, exist_ok=True)
        disabled = None
        if lean_session(onnx_path, chosen):
            options.enable_cpu_mem_arena, disabled = False, ["ConstantFolding"]
        sess = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen,
                                    disabled_optimizers=disabled)
        lost = lost_providers([name for name, _ in chosen], sess.get_providers())
        if lost:
            raise UserError(f"ONNX Runtime could not start {', '.join(lost)} for {Path(onnx_path).name} "
                            f"(it would run on {', '.join(sess.get_providers())}); check the CUDA/cuDNN/TensorRT "
                            "libraries it needs (see its warning above)")
        return sess

    return session


class DeviceResidentRunner(BaseRunner):
    """ONNX Runtime with inputs and outputs bound to fixed device buffers (IO binding).

    Outputs stay on the device unless asked for: timing measures the engine, not host copies (a Segmenter's
    150x640x640 logits cost ~25 ms to copy on an H100). The buffers are allocated once (the graphs are
    static) and every feed is copied into them before the timed region, whatever array it comes in: a cache
    keyed on the array's id would serve a freed array's data to the next one given its id, and a CUDA
    graph needs the fixed addresses anyway (the first run captures it, later runs replay it). Latency is wall
    time around run + synchronize: ONNX Runtime has no CUDA-event API of its own. `device` is "cuda" on a GPU;
    "cpu" runs the same binding code where no GPU is (the tests).
    """

    def __init__(self, session: Any, name: str, cuda_graph: bool = False, device: str = "cuda"):
        super().__init__(name=name, prefix="ort-device-runner")
        self._load, self._cuda_graph, self._device = session, cuda_graph, device
        self.sess = self.binding = None
        self._inputs: dict[str, ort.OrtValue] = {}
        self._outputs: list[Any] = []

    def activate_impl(self) -> None:
        import onnxruntime as ort

        self.sess = self._load()
        self.binding = self.sess.io_binding()
        self._inputs, self._outputs = {}, []
        for inp in self.sess.get_inputs():
            self._inputs[inp.name] = _buffer(ort, inp, self._device)
            self.binding.bind_ortvalue_input(inp.name, self._inputs[inp.name])
        for out in self.sess.get_outputs():
            if not self._cuda_graph and not _static(out):  # ONNX Runtime sizes it on each run
                self.binding.bind_output(out.name, self._device, 0)
                continue
            self._outputs.append(_buffer(ort, out, self._device))
            self.binding.bind_ortvalue_output(out.name, self._outputs[-1])

    def get_input_metadata_impl(self) -> Any:
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for inp in self.sess.get_inputs():
            meta.add(inp.name, dtype=_numpy_type(inp.type), shape=inp.shape)
        return meta

    def _copy_inputs(self, feed: dict[str, np.ndarray]) -> None:
        """Each array into its input's buffer, as the buffer's contiguous type (update_inplace copies raw
        bytes: a float64 array would land in a float32 buffer unconverted)."""
        import numpy as np

        for name, array in feed.items():
            buffer = self._inputs[name]
            array = np.ascontiguousarray(array, dtype=_numpy_type(buffer.data_type()))
            if tuple(array.shape) != tuple(buffer.shape()):
                raise UserError(f"{self.name}: input {name} has shape {tuple(array.shape)}, the graph's is "
                                f"{tuple(buffer.shape())} (static shapes: export again at that size)")
            buffer.update_inplace(array)

    def infer_impl(self, feed_dict: dict[str, np.ndarray], copy_outputs_to_host: bool = True) -> OrderedDict:
        self._copy_inputs(feed_dict)
        self.binding.synchronize_inputs()
        start = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        self.inference_time = time.perf_counter() - start
        if not copy_outputs_to_host:
            return OrderedDict()
        names = [o.name for o in self.sess.get_outputs()]
        return OrderedDict(zip(names, self.binding.copy_outputs_to_cpu()))

    def deactivate_impl(self) -> None:
        self.sess = self.binding = None
        self._inputs, self._outputs = {}, []


def _static(arg: Any) -> bool:
    return all(isinstance(d, int) for d in arg.shape)


def _buffer(ort: Any, arg: Any, device: str) -> Any:
    """A device buffer of a graph input's or output's static shape and type (a CUDA graph replays on fixed
    buffers, and inputs are copied into theirs)."""
    if not _static(arg):
        raise UserError(f"{arg.name} has shape {arg.shape}: device buffers (and CUDA graphs) need the static shapes "
                        "`hgdeploy export` writes; export again")
    return ort.OrtValue.ortvalue_from_shape_and_type(arg.shape, _numpy_type(arg.type), device, 0)


ORT_TYPES = {"float": "float32", "float16": "float16", "double": "float64", "int64": "int64", "int32": "int32",
             "int8": "int8", "uint8": "uint8", "bool": "bool"}


def _numpy_type(ort_type: str) -> Any:
    """numpy's dtype for ONNX Runtime's type string ("tensor(float16)" -> float16)."""
    import numpy as np

    name = ORT_TYPES.get(ort_type.removeprefix("tensor(").removesuffix(")"))
    if name is None:
        raise UserError(f"ONNX Runtime type {ort_type} is not one hgdeploy binds to device buffers "
                        f"({', '.join(ORT_TYPES)})")
    return np.dtype(name)


def versions(profile: EngineProfile) -> dict[str, str]:
    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__}
    if uses_gpu(profile, onnxruntime.get_available_providers()):
        out["gpu"] = str(machine.cuda_gpu_name())
    return out


BACKEND = Backend("onnxruntime", check=check, available=available, runner=runner, versions=versions)
