"""What the commands measure, as types, and report.json's shape made from them in one place (`Report.to_json`).

Each step returns the part of the report it measured; a command joins the parts with `|` (later parts win, as
dict union did) and writes `to_json()`: the contract other tools read, whose keys and order do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from hgdeploy.core.files import JsonObject
from hgdeploy.core.recipe import Section
from hgdeploy.graph.deploy import Converted, Optimized
from hgdeploy.graph.fusion import FusionSummary
from hgdeploy.measure.checks import Parity
from hgdeploy.measure.profile import Profiles
from hgdeploy.measure.timing import Load, Timing, speedup_interval


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: str
    values: dict[str, Section]

    def to_json(self) -> JsonObject:
        return {"name": self.name, "path": self.path, "values": self.values}


@dataclass(frozen=True)
class Weights:
    """The weights' provenance: fidelity only means something for trained weights."""

    checkpoint: str | None
    pretrained: bool
    source: str

    def to_json(self) -> JsonObject:
        return {"checkpoint": self.checkpoint, "pretrained": self.pretrained, "source": self.source}


@dataclass(frozen=True)
class Latency:
    """Interleaved timings of every runner (baseline, patched, ... torch_baseline, torch_patched), and the machine's
    load around them."""

    timings: dict[str, Timing]
    batch: int = 1  # images per timed run
    load: Load | None = None

    def interval(self, slow: str, fast: str) -> tuple[float, float] | None:
        """The confidence interval of `slow` / `fast` (timing.speedup_interval over their paired rounds)."""
        if slow not in self.timings or fast not in self.timings:
            return None
        return speedup_interval(self.timings[slow].rounds_ms, self.timings[fast].rounds_ms)

    @property
    def median_ms(self) -> dict[str, float]:
        return {k: t.median_ms for k, t in self.timings.items()}

    @property
    def images_per_s(self) -> dict[str, float]:
        """Throughput of each runner: the batch over its median run."""
        return {k: self.batch * 1000.0 / t.median_ms for k, t in self.timings.items()}

    @property
    def speedup(self) -> float:
        """baseline / patched, medians."""
        return self.timings["baseline"].median_ms / self.timings["patched"].median_ms

    @property
    def speedup_ci(self) -> tuple[float, float] | None:
        """The speed-up's 95 % confidence interval (None with too few rounds)."""
        return self.interval("baseline", "patched")

    @property
    def speedup_torch(self) -> float | None:
        if "torch_baseline" not in self.timings:
            return None
        return self.timings["torch_baseline"].median_ms / self.timings["torch_patched"].median_ms

    @property
    def passes_speedup(self) -> float | None:
        """The graph passes' own speed-up: the patched graph before them over the one after (an fp32 profile)."""
        if "patched_unoptimized" not in self.timings:
            return None
        return self.timings["patched_unoptimized"].median_ms / self.timings["patched"].median_ms

    def to_json(self) -> JsonObject:
        """report.json's latency_ms, latency, speedup, speedup_ci, load (and speedup_torch, passes_speedup with
        their intervals) keys."""
        out: JsonObject = {"latency_ms": dict(self.median_ms),
                           "latency": {k: t.to_dict() for k, t in self.timings.items()}, "speedup": self.speedup,
                           "speedup_ci": _pair(self.speedup_ci)}
        if self.load is not None:
            out["load"] = self.load.to_dict()
        if self.batch != 1:  # batch-1 reports keep their shape
            out["batch"], out["images_per_s"] = self.batch, dict(self.images_per_s)
        if self.speedup_torch is not None:
            out["speedup_torch"] = self.speedup_torch
            out["speedup_torch_ci"] = _pair(self.interval("torch_baseline", "torch_patched"))
        if self.passes_speedup is not None:
            out["passes_speedup"] = self.passes_speedup
            out["passes_speedup_ci"] = _pair(self.interval("patched_unoptimized", "patched"))
        return out


def _pair(ci: tuple[float, float] | None) -> list[float] | None:
    """An interval as report.json holds it: [low, high], or null where there were too few rounds for one."""
    return None if ci is None else [ci[0], ci[1]]


@dataclass(frozen=True)
class Report:
    """A command's results in report.json's order; what it did not measure stays None and is left out."""

    recipe: RecipeInfo | None = None
    weights: Weights | None = None
    plan: JsonObject | None = None
    preprocess: JsonObject | None = None
    engine: JsonObject | None = None  # `hgdeploy export`: the profile it exported for
    backend: JsonObject | None = None  # the profile, library versions and machine a timing was measured with
    images: list[str] | None = None
    optimize: Optimized | None = None  # also report.json's "lint"
    fusion: dict[str, FusionSummary] | None = None  # each fused twin's attention fusion
    fp16: dict[str, Converted] | None = None
    onnx: dict[str, str] | None = None
    parity: Parity | None = None
    fidelity: JsonObject | None = None
    quality: JsonObject | None = None  # fidelity against the budget (report.quality)
    gflops: dict[str, float | None] | None = None
    latency: Latency | None = None  # report.json's latency_ms, latency, speedup, speedup_ci, load (and speedup_torch)
    engines: JsonObject | None = None  # `hgdeploy build`: what was built from which graph
    profile: Profiles | None = None  # `hgdeploy bench --profile`: where each engine's milliseconds go
    batches: list[JsonObject] | None = None  # `hgdeploy bench --batch`: throughput per batch size
    memory: JsonObject | None = None  # the estimate made before the heavy work, and each step's measured peak

    def __or__(self, other: Report) -> Report:
        """This report with every section `other` measured (other's win)."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other)
                                if getattr(other, f.name) is not None})

    def to_json(self) -> JsonObject:
        out: JsonObject = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, (Optimized, Latency)):
                out |= value.to_json()
            elif f.name in ("fp16", "fusion"):
                out[f.name] = {twin: c.to_json() for twin, c in value.items()}
            elif isinstance(value, (RecipeInfo, Weights, Parity, Profiles)):
                out[f.name] = value.to_json()
            else:
                out[f.name] = value
        return out
