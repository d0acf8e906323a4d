"""ONNX Runtime (CPU, CUDA and TensorRT execution providers) through Polygraphy's OnnxrtRunner."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from polygraphy.backend.base import BaseRunner

from hgdeploy.backends import machine
from hgdeploy.backends.base import Backend
from hgdeploy.backends.profile import ORT_OPT_LEVELS, EngineProfile
from hgdeploy.errors import UserError

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# TensorRT EP options naming cache folders: created before the session so ORT can write there.
CACHE_DIR_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")
QUIET = 3  # ONNX Runtime log severity: 3 = errors only; a provider that fails to start is still caught below
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
    if profile.precision == "fp16" and "tensorrt" not in profile.providers:
        raise UserError(f"{where}: engine.precision = \"fp16\" with onnxruntime needs the \"tensorrt\" provider "
                        "(the CPU and CUDA providers run the fp32 graph as exported)")


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
    for short in profile.providers:
        if provider_name(short, have) is None:
            wanted = PROVIDER_NAMES.get(short.lower(), f"provider matching {short!r}")
            hint = f"; {GPU_HINT}" if wanted in GPU_PROVIDERS else ""
            return (f"engine.providers asks for {short!r}, but onnxruntime {ort.__version__} has no {wanted} "
                    f"(it has {', '.join(have)}){hint}")
    if uses_gpu(profile, have) and machine.cuda_gpu_name() is None:
        return machine.NO_GPU
    return None


def uses_gpu(profile: EngineProfile, have: Iterable[str]) -> bool:
    have = list(have)
    return any(provider_name(p, have) in GPU_PROVIDERS for p in profile.providers)


def providers(profile: EngineProfile, have: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(provider, options) pairs for InferenceSession, in the profile's priority order."""
    have = list(have)
    out = []
    for short in profile.providers:
        name = provider_name(short, have)
        if name is None:
            raise UserError(f"engine profile {profile.name}: onnxruntime has no provider for {short!r}")
        options = dict(profile.provider_options.get(short, {}))
        if name == "TensorrtExecutionProvider" and profile.precision == "fp16":
            options["trt_fp16_enable"] = True
        out.append((name, options))
    return out


def lost_providers(requested: Iterable[str], active: Iterable[str]) -> list[str]:
    """Providers ONNX Runtime was asked for but did not start (it falls back to CPU with a warning)."""
    active = set(active)
    return [name for name in requested if name not in active]


def runner(onnx_path: Path, profile: EngineProfile) -> BaseRunner:
    """An ONNX Runtime runner through Polygraphy (session built lazily on activate)."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    chosen = providers(profile, ort.get_available_providers())

    def session() -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = QUIET  # graph-optimizer notes ("cannot remove node") are not for users
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                   ORT_OPT_LEVELS[profile.graph_optimization_level])
        if profile.threads:
            options.intra_op_num_threads = profile.threads
        for _, opts in chosen:
            for key in CACHE_DIR_OPTIONS:
                if key in opts:
                    Path(str(opts[key])).mkdir(parents=True, exist_ok=True)
        sess = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        lost = lost_providers([name for name, _ in chosen], sess.get_providers())
        if lost:
            raise UserError(f"ONNX Runtime could not start {', '.join(lost)} for {Path(onnx_path).name} "
                            f"(it would run on {', '.join(sess.get_providers())}); check the CUDA/cuDNN/TensorRT "
                            "libraries it needs (see its warning above)")
        return sess

    return OnnxrtRunner(session, name=f"{profile.name}:{Path(onnx_path).stem}")


def versions(profile: EngineProfile) -> dict[str, str]:
    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__}
    if uses_gpu(profile, onnxruntime.get_available_providers()):
        out["gpu"] = str(machine.cuda_gpu_name())
    return out


BACKEND = Backend("onnxruntime", check=check, available=available, runner=runner, versions=versions)
