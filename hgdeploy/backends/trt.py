"""TensorRT through Polygraphy: network from ONNX, builder config, engine, runner; engines kept with a manifest.

Networks are strongly typed: precision is what the ONNX graph says (fp16 graphs come from
hgdeploy.graph.fp16, with the clustering layers as fp32 islands), as TensorRT 11 requires and TensorRT 10
allows with the STRONGLY_TYPED flag; no builder precision flags, no per-layer precision. TensorRT is
imported inside functions only, so a machine without it can still check profiles and manifests.
Written against TensorRT's and Polygraphy's documented APIs; it has not run on our machines
(TensorRT's builder cannot be installed there).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from polygraphy.backend.base import BaseRunner

from hgdeploy.backends import machine
from hgdeploy.backends.base import Backend
from hgdeploy.backends.profile import EngineProfile
from hgdeploy.core.contract import BATCH_AXIS, graph_sha256
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject, file_sha256


def check(profile: EngineProfile) -> None:
    if profile.workspace_mb < 0:
        raise UserError(f"{profile.path}: engine.workspace_mb must be >= 0 (0 = TensorRT's default)")
    r = profile.batch_range
    if len(r) != 3 or not all(isinstance(b, int) and not isinstance(b, bool) for b in r) or not 1 <= r[0] <= r[1] <= r[2]:
        raise UserError(f"{profile.path}: engine.batch_range must be [min, opt, max] batches, 1 <= min <= opt <= max, "
                        f"not {list(r)}")


def available(profile: EngineProfile) -> str | None:
    """Why TensorRT cannot run the profile here (not installed, its libraries do not load, no GPU), or None."""
    try:
        version = machine.tensorrt_version()
    except (ImportError, OSError) as exc:
        return f"TensorRT is installed but does not import ({exc})"
    if version is None:
        return f"TensorRT is not installed ({machine.GPU_INSTALL_HINT})"
    return None if machine.cuda_gpu_name() else machine.NO_GPU


def versions(profile: EngineProfile) -> dict[str, str]:
    return {"tensorrt": str(machine.tensorrt_version()), "gpu": str(machine.cuda_gpu_name())}


def strongly_typed_flag(version: str) -> bool | None:
    """Polygraphy's `strongly_typed` for this TensorRT: set on 10.x; 11 builds nothing else (None: its default)."""
    return True if int(version.split(".")[0]) < 11 else None


def engine_paths(onnx_path: Path, profile_name: str, folder: Path) -> dict[str, Path]:
    """The three files of one build: <stem>.<profile>.engine, .timing.cache and .manifest.json."""
    base = f"{Path(onnx_path).stem}.{profile_name}"
    return {"engine": Path(folder) / f"{base}.engine", "timing_cache": Path(folder) / f"{base}.timing.cache",
            "manifest": Path(folder) / f"{base}.manifest.json"}


def _manifest_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name.removesuffix(".engine") + ".manifest.json")


def onnx_input_shapes(onnx_path: Path, batch_range: tuple[int, ...] = (1, 1, 1)) -> dict[str, list[list[int]]]:
    """Each input's [min, opt, max] shapes for TensorRT's optimisation profile (weights not loaded): its static
    shape three times, or with a batch axis (core.contract.BATCH_AXIS first) the batch_range's three batches;
    UserError for any other dynamic dimension."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        dims = list(inp.type.tensor_type.shape.dim)
        batched = bool(dims) and dims[0].dim_param == BATCH_AXIS
        if any(not d.HasField("dim_value") for d in dims[1 if batched else 0:]):
            raise UserError(f"{onnx_path}: input {inp.name} has a dynamic dimension other than a batch axis; "
                            "TensorRT profiles here build for the shapes `hgdeploy export` writes")
        rest = [d.dim_value for d in dims[1:]]
        shapes[inp.name] = ([[b, *rest] for b in batch_range] if batched
                            else [[d.dim_value for d in dims]] * 3)
    return shapes


def manifest_mismatch(manifest: JsonObject, here: JsonObject) -> str | None:
    """Why an engine's manifest does not fit this machine and source, or None.

    Engines only run on the TensorRT version and GPU model they were built with, and only
    describe the ONNX file they were built from.
    """
    built = (manifest.get("tensorrt"), manifest.get("gpu"))
    now = (here.get("tensorrt"), here.get("gpu"))
    if built != now:
        return (f"engine was built with TensorRT {built[0]} on {built[1]}, "
                f"this machine has TensorRT {now[0]} on {now[1]}")
    if manifest.get("source_sha256") != here.get("source_sha256"):
        return (f"engine was built from an ONNX file with sha256 {str(manifest.get('source_sha256'))[:12]}…, "
                f"the ONNX file now has {str(here.get('source_sha256'))[:12]}… (re-exported?)")
    if manifest.get("precision") != here.get("precision"):
        return f"engine was built at {manifest.get('precision')}, the profile asks for {here.get('precision')}"
    if "engine_sha256" in here and manifest.get("engine_sha256") != here["engine_sha256"]:
        return "the engine file does not match its manifest's sha256 (interrupted or copied build?)"
    return None


def engine_problem(engine_path: Path, onnx_path: Path, profile: EngineProfile) -> str | None:
    """Why the engine at `engine_path` cannot be used for `onnx_path` on this machine, or None."""
    engine_path = Path(engine_path)
    manifest_path = _manifest_path(engine_path)
    if not engine_path.is_file():
        return f"{engine_path.name} has not been built"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return f"{manifest_path.name} is missing (interrupted build?)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"cannot read {manifest_path.name}: {exc}"
    here = {"tensorrt": machine.tensorrt_version(), "gpu": machine.cuda_gpu_name(),
            "source_sha256": graph_sha256(onnx_path), "precision": profile.precision,
            "engine_sha256": file_sha256(engine_path)}
    return manifest_mismatch(manifest, here)


def build_trt_engine(onnx_path: Path, profile: EngineProfile, out_dir: Path) -> Path:
    """Build a TensorRT engine for `onnx_path` with Polygraphy; returns the engine path.

    Engine, timing cache and manifest are written to a staging folder and renamed into `out_dir`
    together (the old manifest goes first), so a reader never pairs a manifest with another build.
    """
    import tensorrt as trt
    from polygraphy import util as pg_util
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    final = engine_paths(onnx_path, profile.name, out_dir)
    shapes = onnx_input_shapes(onnx_path, profile.batch_range)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed_flag(trt.__version__))
    shape_profile = Profile()
    for name, (low, opt, high) in shapes.items():
        shape_profile.add(name, min=low, opt=opt, max=high)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final['engine'].name}.building-", dir=out_dir))
    try:
        staged = {key: stage / p.name for key, p in final.items()}
        if profile.timing_cache and final["timing_cache"].is_file():
            shutil.copyfile(final["timing_cache"], staged["timing_cache"])  # Polygraphy locks and appends here
        workspace = {trt.MemoryPoolType.WORKSPACE: profile.workspace_mb << 20} if profile.workspace_mb else None
        cache = str(staged["timing_cache"])
        config = CreateConfig(profiles=[shape_profile], memory_pool_limits=workspace,
                              load_timing_cache=cache if staged["timing_cache"].is_file() else None)
        engine = EngineBytesFromNetwork(network, config=config,
                                        save_timing_cache=cache if profile.timing_cache else None)()
        pg_util.save_file(engine, str(staged["engine"]), description="engine")
        manifest = {
            "profile": profile.name, "precision": profile.precision, "tensorrt": trt.__version__,
            "gpu": machine.cuda_gpu_name(), "source": onnx_path.name, "source_sha256": graph_sha256(onnx_path),
            "inputs": shapes, "engine": final["engine"].name, "engine_sha256": file_sha256(staged["engine"]),
            "timing_cache": final["timing_cache"].name if profile.timing_cache else None,
            "workspace_mb": profile.workspace_mb, "strongly_typed": True,
        }
        staged["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        final["manifest"].unlink(missing_ok=True)
        os.replace(staged["engine"], final["engine"])
        if profile.timing_cache:
            os.replace(staged["timing_cache"], final["timing_cache"])
        else:
            final["timing_cache"].unlink(missing_ok=True)
        os.replace(staged["manifest"], final["manifest"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final["engine"]


def load_trt_engine(engine_path: Path, onnx_path: Path, profile: EngineProfile) -> Any:
    """A Polygraphy EngineFromBytes loader for a built engine; UserError naming any manifest mismatch."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    problem = engine_problem(Path(engine_path), Path(onnx_path), profile)
    if problem is not None:
        raise UserError(f"{engine_path}: {problem}")
    return EngineFromBytes(BytesFromPath(str(engine_path)))


def runner(onnx_path: Path, profile: EngineProfile, engine_dir: Path | None = None) -> BaseRunner:
    """A TensorRT runner; on activate it loads the matching engine in `engine_dir` or builds it.

    `engine_dir` defaults to the ONNX file's folder, so engines sit beside the models they came from.
    """

    from hgdeploy.core import progress

    onnx_path = Path(onnx_path)
    folder = Path(engine_dir) if engine_dir is not None else onnx_path.parent
    engine_path = engine_paths(onnx_path, profile.name, folder)["engine"]

    def engine() -> Any:
        problem = engine_problem(engine_path, onnx_path, profile)
        if problem is not None:
            progress.info(f"Building {engine_path.name}: {problem}")
            build_trt_engine(onnx_path, profile, folder)
        return load_trt_engine(engine_path, onnx_path, profile)()

    return device_feed_trt_runner(engine, name=f"{profile.name}:{onnx_path.stem}")


def device_feed_trt_runner(engine: Any, name: str) -> BaseRunner:
    """Polygraphy's TrtRunner fed from device buffers: each host feed is copied into its input's buffer
    (allocated once) before Polygraphy's infer, whose timed region then sees device-resident inputs.

    Timed runs pass `copy_outputs_to_host=False` (Polygraphy's own argument), so outputs stay on the device
    too. Every feed is copied: a cache keyed on the arrays' ids would serve a freed array's data to a new
    one that got its id. The copy is done in `infer`, not `infer_impl`: Polygraphy warns on every call of
    an infer_impl that `infer` did not make.
    """
    import numpy as np
    from polygraphy import cuda
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.datatype import DataType

    class _Runner(TrtRunner):
        def activate_impl(self) -> None:
            self._device_inputs: dict[str, tuple[Any, Any]] = {}  # name -> ((shape, dtype), DeviceArray)
            super().activate_impl()

        def infer(self, feed_dict: dict, check_inputs: bool = True, *args: Any, **kwargs: Any) -> Any:
            if not self.is_active:  # Polygraphy's own message for it
                return super().infer(feed_dict, check_inputs, *args, **kwargs)
            buffers = self._device_inputs
            for key, array in feed_dict.items():
                array = np.ascontiguousarray(array)
                kind = (array.shape, array.dtype.str)
                if key not in buffers or buffers[key][0] != kind:
                    if key in buffers:
                        buffers[key][1].free()
                    buffers[key] = (kind, cuda.DeviceArray(shape=array.shape, dtype=DataType.from_dtype(array.dtype)))
                buffers[key][1].copy_from(array)
            return super().infer({k: buffers[k][1] for k in feed_dict}, check_inputs, *args, **kwargs)

        def deactivate_impl(self) -> None:
            for _, held in self._device_inputs.values():
                held.free()
            self._device_inputs = {}
            super().deactivate_impl()

    return _Runner(engine, name=name)


BACKEND = Backend("tensorrt", check=check, available=available, runner=runner, versions=versions)
