"""Where an engine's milliseconds go: ONNX Runtime's per-node profile summed by op type and by part of the model.

ONNX Runtime's profiler (SessionOptions.enable_profiling) writes a Chrome trace: one "model_run" event per
run and, per node and run, a "<node name>_kernel_time" event (cat "Node", args.op_name, dur in µs; the
"_fence_before/_after" events around it are left out). Its node names are the graph's, or the graph's name with
"/<FusionName>" appended when ORT fused nodes, so each kernel is traced back to the module path the exporter
recorded ("pkg.torch.onnx.name_scopes", `core.contract.node_scopes`) and from it to a part: the clustering and
reconstruction layers the export lists, attention, MLP, or the rest (kernels ORT made up, such as layout
reorders, carry no path). Nothing here runs a model or imports torch.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from hgdeploy.core.contract import LAYER_MARKERS
from hgdeploy.core.files import JsonObject

PARTS = ("clustering", "reconstruction", "attention", "mlp", "rest")
# A clustering spec's kind -> the part its nodes count in (the window layers wrap the plain ones).
LAYER_PARTS = {"clustering": "clustering", "window_clustering": "clustering",
               "reconstruction": "reconstruction", "window_reconstruction": "reconstruction"}
# Module names (one component of a module path) that mark attention or MLP in the families' models: timm,
# Segmenter and SAM (attn, mlp), HF DINOv2 (attention, mlp), HF ViT/Swin (attention, intermediate, output).
ATTENTION_MODULES = frozenset({"attn", "attention", "self_attn", "self_attention", "cross_attn"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                           "PackedMultiHeadAttention", "SparseAttention"})
MLP_MODULES = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "intermediate", "fc1", "fc2"})
KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class GraphProfile:
    """One graph's profile: per kernel the median µs over the profiled runs, summed by op type and by part."""

    graph: str
    runs: int
    run_ms: float  # median wall time of a profiled run: kernels, the executor between them, the profiler itself
    by_op: dict[str, float]  # ms
    by_part: dict[str, float] = field(default_factory=dict)  # ms, every part of PARTS
    kernels: int = 0  # nodes ORT ran (after its own fusions)
    unscoped: int = 0  # kernels traced back to no module path (counted in "rest")
    unscoped_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return sum(self.by_op.values())

    def to_json(self) -> JsonObject:
        return {"graph": self.graph, "runs": self.runs, "run_ms": self.run_ms, "kernels_ms": self.total_ms,
                "by_part": dict(self.by_part), "by_op": dict(self.by_op), "kernels": self.kernels,
                "unscoped_kernels": self.unscoped, "unscoped_ms": self.unscoped_ms}


@dataclass(frozen=True)
class Layers:
    """What the export says about a graph's nodes: module paths per node name, and the layers' scopes."""

    scopes: dict[str, list[str]]
    layer_parts: dict[str, str]  # layer scope -> "clustering" | "reconstruction"

    @classmethod
    def of(cls, scopes: dict[str, list[str]], specs: list[dict]) -> Layers:
        return cls(scopes, {s["scope"]: LAYER_PARTS.get(s["kind"], "clustering") for s in specs})


def read_trace(path: Path) -> list[JsonObject]:
    """ONNX Runtime's trace file: a JSON list of events."""
    return json.loads(Path(path).read_text())


def kernel_times(events: list[JsonObject], skip: int) -> tuple[dict[str, tuple[str, list[float]]], list[float]]:
    """Node name -> (op type, µs in each run), and each run's wall µs, for the runs after the first `skip`
    (warm-up: the profiler records from the session's start)."""
    runs = sorted((float(e["ts"]), float(e["dur"])) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    nodes: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        ts = float(e["ts"])
        if not any(start <= ts <= start + dur for start, dur in runs):
            continue
        args = e.get("args") or {}
        op = str(args.get("op_name", "?")) if isinstance(args, dict) else "?"
        nodes.setdefault(name[: -len(KERNEL_SUFFIX)], (op, []))[1].append(float(e["dur"]))
    return nodes, [dur for _, dur in runs]


def module_path(name: str, scopes: dict[str, list[str]]) -> list[str] | None:
    """The module paths of a traced node: its own, or that of the graph node ORT fused it from (the longest
    "/"-prefix of its name that is a node), past the precision marker the graph passes prepend; None if neither."""
    for marker in LAYER_MARKERS:
        name = name.removeprefix(f"{marker}/")
    cut = len(name)
    while cut > 0:
        if name[:cut] in scopes:
            return scopes[name[:cut]]
        cut = name.rfind("/", 0, cut)
    return None


def part_of(op: str, path: list[str] | None, layers: Layers) -> str:
    """The part a kernel counts in: a clustering/reconstruction layer first, then attention, MLP, the rest."""
    for scope, part in layers.layer_parts.items():
        if path and scope in path:
            return part
    names = [c for p in path or () for c in p.split(".")]
    if op in ATTENTION_OPS or ATTENTION_MODULES.intersection(names):
        return "attention"
    if MLP_MODULES.intersection(names) or any(p.endswith("output.dense") for p in path or ()):
        return "mlp"
    return "rest"


def summarise(graph: str, events: list[JsonObject], skip: int, layers: Layers) -> GraphProfile:
    """Per kernel the median over the kept runs, summed by op type and by part (the two sums are equal)."""
    nodes, runs = kernel_times(events, skip)
    by_op: dict[str, float] = {}
    by_part = dict.fromkeys(PARTS, 0.0)
    unscoped, unscoped_ms = 0, 0.0
    for name, (op, durations) in nodes.items():
        ms = statistics.median(durations) / 1e3
        path = module_path(name, layers.scopes)
        if path is None:
            unscoped, unscoped_ms = unscoped + 1, unscoped_ms + ms
        by_op[op] = by_op.get(op, 0.0) + ms
        by_part[part_of(op, path, layers)] += ms
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    run_ms = statistics.median(runs) / 1e3 if runs else 0.0
    return GraphProfile(graph, len(runs), run_ms, by_op, by_part, len(nodes), unscoped, unscoped_ms)


@dataclass(frozen=True)
class Profiles:
    """The profiles of the graphs an engine ran (baseline and patched), as profile.json and `--json` hold them."""

    engine: str
    warmup: int  # runs left out before the profiled ones
    graphs: dict[str, GraphProfile]
    providers: list[str] = field(default_factory=list)

    def to_json(self) -> JsonObject:
        note = ("ONNX Runtime's kernel_time per node: the median over the profiled runs (after warm-up, in a session "
                "of its own, apart from the timed runs), summed by part and by op type; on a GPU provider the times "
                "are those ORT's profiler records for each node, not verified against the device's own timings")
        return {"engine": self.engine, "providers": list(self.providers), "warmup": self.warmup, "note": note,
                "graphs": {key: g.to_json() for key, g in self.graphs.items()}}
