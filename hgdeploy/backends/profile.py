"""Engine profiles (engines/*.toml): the schema, and the rules every backend shares.

A profile names a backend and its settings plus the parity thresholds and bench settings that go
with it. Rules that belong to one backend live in that backend's module (`check`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgdeploy.core.config import bundled_folders, check_key, resolve_toml
from hgdeploy.core.contract import OUTPUT_KINDS
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject

BUNDLED_PROFILES = bundled_folders("engines")
DEFAULT_PROFILE = "ort-cpu"

PROFILE_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "engine": {"backend": (str,), "device": (str,), "providers": (list,), "precision": (str,),
               "graph_optimization_level": (str,), "threads": (int,), "provider_options": (dict,),
               "cuda_graph": (bool,), "workspace_mb": (int,), "timing_cache": (bool,), "fused_attention": (bool,),
               "batch_range": (list,)},
    "parity": {"cosine_min": (float, int), "max_abs": (float, int), "max_abs_per_output": (dict,),
               "max_abs_per_kind": (dict,), "max_abs_rel": (float, int), "task_agreement_min": (float, int)},
    "bench": {"warmup": (int,), "runs": (int,)},
}
# Keys that only mean something to one backend: setting one for the other backend is an error, not ignored.
BACKEND_KEYS = {
    "onnxruntime": {"providers", "graph_optimization_level", "threads", "provider_options", "cuda_graph",
                    "fused_attention"},
    "tensorrt": {"workspace_mb", "timing_cache", "batch_range"},
}
BACKEND_NAMES = tuple(BACKEND_KEYS)
PRECISIONS = ("fp32", "fp16")
DEVICES = ("cpu", "gpu")
GPU_PROVIDERS = ("cuda", "tensorrt")  # the profile names of ONNX Runtime's GPU providers
ORT_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                  "all": "ORT_ENABLE_ALL"}


# An ONNX Runtime provider's options, as the profile's TOML gives them (ORT takes scalars).
ProviderOptions = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class EngineProfile:
    name: str
    path: str
    backend: str
    device: str = ""  # "cpu" or "gpu"; empty: what the backend and providers imply
    providers: tuple[str, ...] = ("cpu",)
    precision: str = "fp32"
    graph_optimization_level: str = "all"
    threads: int = 0  # 0: the backend's default (all cores)
    provider_options: dict[str, ProviderOptions] = field(default_factory=dict)  # ORT: provider -> its options
    cuda_graph: bool = False  # ORT CUDA: capture the whole graph once and replay it (no per-kernel launches)
    # ORT: run the *.fused graphs (each attention block one MultiHeadAttention node, LayerNorm in fp16 with fp32
    # statistics); TensorRT parses no com.microsoft op and fuses attention itself, so its graphs stay plain
    fused_attention: bool = False
    workspace_mb: int = 0  # TensorRT builder workspace limit; 0: TensorRT's default
    timing_cache: bool = True  # TensorRT: load/save <stem>.<profile>.timing.cache beside the engine
    # TensorRT: (min, opt, max) batch of the optimisation profile built for a graph with a batch axis
    # (model.batch = "dynamic"); a static graph is built for its own shapes
    batch_range: tuple[int, ...] = (1, 8, 32)
    cosine_min: float = 0.9999
    max_abs: float = 1e-2
    max_abs_per_output: dict[str, float] = field(default_factory=dict)  # output name -> its own max_abs
    max_abs_per_kind: dict[str, float] = field(default_factory=dict)  # output kind (heatmap, ...) -> its max_abs
    max_abs_rel: float = 0.0  # plus this times the output's largest |reference|: bounds that fit every model
    # `hgdeploy eval`: the engine's agreement with patched PyTorch in the task's headline metric, as a fraction
    # (mIoU / 100, depth delta1, saliency max F); below it eval exits 1. None: no task gate.
    task_agreement_min: float | None = None
    warmup: int = 3
    runs: int = 15

    def __post_init__(self) -> None:
        if not self.device:  # frozen: set once, from what the profile's backend and providers imply
            implied = "gpu" if self.backend == "tensorrt" or set(self.providers) & set(GPU_PROVIDERS) else "cpu"
            object.__setattr__(self, "device", implied)

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"

    def unknown_outputs(self, output_names: tuple[str, ...]) -> list[str]:
        """Names in parity.max_abs_per_output that the model does not output: a bound that would never apply."""
        return sorted(set(self.max_abs_per_output) - set(output_names))

    def max_abs_bounds(self, outputs: tuple[tuple[str, str], ...]) -> dict[str, float]:
        """Each (name, kind) output's own absolute bound: by name, else by kind; outputs without one use max_abs."""
        by_kind = {name: self.max_abs_per_kind[kind] for name, kind in outputs if kind in self.max_abs_per_kind}
        return by_kind | self.max_abs_per_output

    def to_dict(self) -> JsonObject:
        common = {"name": self.name, "backend": self.backend, "device": self.device, "precision": self.precision}
        if self.backend == "tensorrt":
            return common | {"workspace_mb": self.workspace_mb, "timing_cache": self.timing_cache,
                             "batch_range": list(self.batch_range)}
        return common | {"providers": list(self.providers), "graph_optimization_level": self.graph_optimization_level,
                         "threads": self.threads, "provider_options": self.provider_options,
                         "cuda_graph": self.cuda_graph, "fused_attention": self.fused_attention}


def resolve_profile_path(name_or_path: str | None) -> Path:
    return resolve_toml(name_or_path, DEFAULT_PROFILE, BUNDLED_PROFILES, "engines", "engine profile")


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    """TOML booleans are ints to Python; only keys declared bool accept them."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def parse_profile(path: Path) -> EngineProfile:
    """Read a profile and check what every backend shares; UserError naming the problem."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read engine profile {path}: {exc}") from exc
    values: dict[str, object] = {}  # checked against the schema, then the profile's fields
    for section, body in data.items():
        check_key(PROFILE_SCHEMA, section, None, str(path))
        if not isinstance(body, dict):
            raise UserError(f"{path}: [{section}] must be a table")
        for key, value in body.items():
            check_key(PROFILE_SCHEMA, section, key, str(path))
            if not _type_ok(value, PROFILE_SCHEMA[section][key]):
                raise UserError(f"{path}: {section}.{key} = {value!r} has the wrong type")
            values[key] = tuple(value) if isinstance(value, list) else value
    if "backend" not in values:
        raise UserError(f"{path}: missing required key engine.backend (one of: {', '.join(BACKEND_NAMES)})")
    if values["backend"] not in BACKEND_NAMES:
        raise UserError(f"{path}: unknown engine.backend {values['backend']!r}; known: {', '.join(BACKEND_NAMES)}")
    _check_backend_keys(values, path)
    profile = EngineProfile(name=path.stem, path=str(path), **values)
    if profile.graph_optimization_level not in ORT_OPT_LEVELS:
        raise UserError(f"{path}: engine.graph_optimization_level must be one of {', '.join(ORT_OPT_LEVELS)}")
    if profile.precision not in PRECISIONS:
        raise UserError(f"{path}: engine.precision must be one of {', '.join(PRECISIONS)}, not {profile.precision!r}")
    if profile.warmup < 0 or profile.runs < 1:
        raise UserError(f"{path}: bench.warmup must be >= 0 and bench.runs >= 1")
    for table in ("max_abs_per_output", "max_abs_per_kind"):
        bad = [k for k, v in getattr(profile, table).items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise UserError(f"{path}: parity.{table}.{bad[0]} must be a number")
    kinds = sorted(set(profile.max_abs_per_kind) - set(OUTPUT_KINDS))
    if kinds:
        raise UserError(f"{path}: parity.max_abs_per_kind.{kinds[0]} is not an output kind (kinds: "
                        f"{', '.join(OUTPUT_KINDS)})")
    if profile.max_abs < 0 or profile.max_abs_rel < 0:
        raise UserError(f"{path}: parity.max_abs and parity.max_abs_rel must be >= 0")
    if profile.task_agreement_min is not None and not 0 <= profile.task_agreement_min <= 1:
        raise UserError(f"{path}: parity.task_agreement_min is a fraction between 0 and 1 (mIoU / 100, delta1, max F)")
    check_device(profile)
    return profile


def check_device(profile: EngineProfile) -> None:
    """The stated device must be the one the backend and providers run on: a profile says where it runs."""
    where = profile.path
    if profile.device not in DEVICES:
        raise UserError(f"{where}: engine.device must be one of {', '.join(DEVICES)}, not {profile.device!r}")
    gpu_providers = sorted(set(profile.providers) & set(GPU_PROVIDERS)) if profile.backend == "onnxruntime" else []
    if profile.backend == "tensorrt" and profile.device != "gpu":
        raise UserError(f"{where}: backend tensorrt runs on the GPU; set engine.device = \"gpu\"")
    if profile.backend == "onnxruntime" and profile.device == "cpu" and gpu_providers:
        raise UserError(f"{where}: engine.device = \"cpu\" but engine.providers lists {gpu_providers[0]!r}, a GPU "
                        "provider; use device = \"gpu\" or drop the provider")
    if profile.backend == "onnxruntime" and profile.device == "gpu" and not gpu_providers:
        raise UserError(f"{where}: engine.device = \"gpu\" needs a GPU provider in engine.providers "
                        f"({' or '.join(GPU_PROVIDERS)})")
    if profile.cuda_graph and "cuda" not in profile.providers:
        raise UserError(f"{where}: engine.cuda_graph needs the \"cuda\" provider (ONNX Runtime's CUDA graphs)")


def _check_backend_keys(values: dict[str, object], path: Path) -> None:
    """A key meant for the other backend would be silently ignored; name it instead."""
    backend = values["backend"]
    for other, keys in BACKEND_KEYS.items():
        stray = sorted(keys & values.keys()) if other != backend else []
        if stray:
            raise UserError(f"{path}: engine.{stray[0]} applies to backend {other}, not {backend}")
