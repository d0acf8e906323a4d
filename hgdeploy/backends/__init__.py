"""Engines: profiles, what this machine has, and one module per backend behind one interface.

Polygraphy-shaped: `profile` (the engines/*.toml schema), `machine` (driver and library probes),
`onnxrt` and `trt` (each a `Backend`: profile rules, availability, a Polygraphy runner, versions) and
`pyt` (PyTorch as a runner, for parity and eager timings; imported only by those who need torch).
GPU profiles are checked before anything runs: `make_runner` turns what this machine lacks into a
one-line UserError. Nothing here imports torch, TensorRT or CUDA at import time.
"""

from __future__ import annotations

from pathlib import Path

from polygraphy.backend.base import BaseRunner

from hgdeploy.backends import machine, onnxrt, trt
from hgdeploy.backends.base import Backend
from hgdeploy.backends.profile import EngineProfile, parse_profile, resolve_profile_path
from hgdeploy.core.errors import UserError

BACKENDS: dict[str, Backend] = {b.name: b for b in (onnxrt.BACKEND, trt.BACKEND)}


def load_profile(name_or_path: str | None = None) -> EngineProfile:
    """Read and validate an engine profile (shared rules, then its backend's); UserError naming the problem."""
    profile = parse_profile(resolve_profile_path(name_or_path))
    BACKENDS[profile.backend].check(profile)
    return profile


def availability(profile: EngineProfile) -> str | None:
    """The reason this profile cannot run on this machine, or None when it can."""
    return BACKENDS[profile.backend].available(profile)


def require_available(profile: EngineProfile) -> None:
    reason = availability(profile)
    if reason is not None:
        raise UserError(f"engine profile {profile.name} cannot run here: {reason}")


def make_runner(onnx_path: Path, profile: EngineProfile, profiling: Path | None = None) -> BaseRunner:
    """The profile's runner for `onnx_path`; UserError first when this machine cannot run the profile.
    profiling: a file prefix for ONNX Runtime's per-node trace (read it with `end_profiling`)."""
    require_available(profile)
    if profiling is not None:
        require_profiler(profile)
        return onnxrt.runner(Path(onnx_path), profile, profiling)
    return BACKENDS[profile.backend].runner(Path(onnx_path), profile)


def require_profiler(profile: EngineProfile) -> None:
    """Per-node profiles come from ONNX Runtime's profiler; TensorRT's layer timings are not read (yet)."""
    if profile.backend != onnxrt.BACKEND.name:
        raise UserError(f"--profile needs an ONNX Runtime profile; {profile.name} is a {profile.backend} profile")


def end_profiling(runner: BaseRunner) -> Path:
    """The per-node trace of an active runner made with `make_runner(..., profiling=...)`."""
    return onnxrt.end_profiling(runner)


def backend_versions(profile: EngineProfile) -> dict[str, str]:
    """Library versions (and GPU) behind a profile, for reports and manifests; UserError if it cannot run here."""
    import polygraphy

    require_available(profile)
    return {"polygraphy": polygraphy.__version__} | BACKENDS[profile.backend].versions(profile)


__all__ = ["BACKENDS", "EngineProfile", "availability", "backend_versions", "end_profiling", "load_profile",
           "machine", "make_runner", "require_available", "require_profiler"]
