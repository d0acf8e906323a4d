"""An export folder as one typed artefact: the graphs it holds, what they were exported from, which a profile runs.

Every command reads and writes export folders through `ExportFolder`; nothing else knows their file names.
The graphs record their own recipe values and plan (the ONNX metadata `patch.export` writes), so a folder
copied or handed on stays self-describing; `manifest.json` lists the graphs for other tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import onnx

from hgdeploy.core import progress
from hgdeploy.core.contract import graph_files, read_export_info
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject, JsonValue, to_json, write_atomic
from hgdeploy.core.recipe import Section

# Each graph an export folder can hold, by role: the two exports, the graph passes' result, the fp16 twins, and
# for ONNX Runtime profiles with fused_attention the fused twins (fp32 and fp16).
GRAPH_FILES = {"baseline": "baseline.onnx", "patched": "patched.onnx", "optimized": "patched.opt.onnx",
               "baseline_fp16": "baseline.fp16.onnx", "patched_fp16": "patched.fp16.onnx",
               "baseline_fused": "baseline.fused.onnx", "patched_fused": "patched.fused.onnx",
               "baseline_fused_fp16": "baseline.fused.fp16.onnx", "patched_fused_fp16": "patched.fused.fp16.onnx"}
FP16_TWINS = {"baseline": "baseline_fp16", "patched": "patched_fp16"}
FUSED_TWINS = {"baseline": "baseline_fused", "patched": "patched_fused"}
FUSED_FP16_TWINS = {"baseline": "baseline_fused_fp16", "patched": "patched_fused_fp16"}
MANIFEST = "manifest.json"
DEFAULT_OUT = Path("runs")


class Engine(Protocol):
    """What the folder needs of an engine profile to choose its graphs (`backends.EngineProfile` is one)."""

    name: str
    precision: str
    fused_attention: bool


def output_folder(recipe_name: str, out: Path | None) -> Path:
    """Where a command writes or reads: --out, else runs/<recipe name>."""
    return Path(out) if out is not None else DEFAULT_OUT / recipe_name


@dataclass(frozen=True)
class ExportFolder:
    """A folder of exported graphs: `graphs` maps each role of GRAPH_FILES present to its file."""

    path: Path
    graphs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def scan(cls, path: Path) -> ExportFolder:
        """The graphs that are in `path` now (none for a new folder)."""
        path = Path(path)
        return cls(path, {role: path / name for role, name in GRAPH_FILES.items() if (path / name).is_file()})

    @classmethod
    def open(cls, path: Path, recipe_values: dict[str, Section]) -> ExportFolder:
        """An existing export, refused (one line) without its two graphs or when they were exported from other
        recipe values than `recipe_values`; an export that does not record them (an older hgdeploy) is noted."""
        folder = cls.scan(path)
        missing = [str(folder.target(r)) for r in ("baseline", "patched") if r not in folder.graphs]
        if missing:
            raise UserError(f"{', '.join(missing)} not found; run `hgdeploy export` with the same --out first")
        if not folder.info:
            progress.info(f"note: {folder.graphs['patched']} does not record the recipe it was exported with (an "
                          f"older hgdeploy?); it is used as it is")
            return folder
        diff = recipe_difference(folder.info.get("recipe", {}).get("values", {}), json.loads(json.dumps(recipe_values)))
        if diff:
            key, old, new = diff
            raise UserError(f"{path} was exported with {key} = {_shown(old)}, but this command asks for "
                            f"{_shown(new)}; export again with these values (hgdeploy export ... --out {path}) or "
                            f"give the recipe and --set values the folder was exported with")
        return folder

    def target(self, role: str) -> Path:
        """Where the graph of `role` lives (or will) in this folder."""
        return self.path / GRAPH_FILES[role]

    def with_graph(self, role: str, path: Path) -> ExportFolder:
        return replace(self, graphs={**self.graphs, role: Path(path)})

    @cached_property
    def info(self) -> JsonObject:
        """What the export recorded about itself (recipe values, plan, preprocessing); {} when it did not."""
        if "patched" not in self.graphs:
            return {}
        return read_export_info(onnx.load(str(self.graphs["patched"]), load_external_data=False)) or {}

    @property
    def recorded_plan(self) -> JsonObject:
        return self.info.get("plan") or {}

    def patched_graph(self, engine: Engine | None = None) -> Path:
        """The patched graph an engine is built from: the profile's twin (fp16, fused) when it runs one, else the
        graph passes' result when there is one."""
        if engine is not None and runs_twins(engine):
            return self._twin("patched", engine)
        return self.graphs.get("optimized", self.graphs["patched"])

    def baseline_graph(self, engine: Engine) -> Path:
        """The unpatched graph the patched one is timed against, in the same precision and form."""
        if runs_twins(engine):
            return self._twin("baseline", engine)
        return self.graphs["baseline"]

    def engine_graphs(self, engine: Engine) -> dict[str, Path]:
        """The graphs a profile runs: baseline and patched in its precision and form and, for a plain fp32 profile
        with an optimized graph, the patched graph before the passes too."""
        graphs = {"baseline": self.baseline_graph(engine), "patched": self.patched_graph(engine)}
        if "optimized" in self.graphs and engine.precision == "fp32" and not engine.fused_attention:
            graphs["patched_unoptimized"] = self.graphs["patched"]
        return graphs

    def _twin(self, source: str, engine: Engine) -> Path:
        role = twin_role(source, engine.precision, engine.fused_attention)
        if role not in self.graphs:
            what = ("fused " if engine.fused_attention else "") + ("fp16 " if engine.precision == "fp16" else "")
            raise UserError(f"{self.target(role)} not found: the {engine.name} profile runs {what}graphs; write them "
                            f"with `hgdeploy export --engine {engine.name}` (same recipe and --out)")
        return self.graphs[role]

    def write_manifest(self) -> Path:
        """manifest.json: every graph of the folder with the files it is made of, and what the export recorded."""
        graphs = {role: {"files": [p.name for p in graph_files(path)],
                         "bytes": sum(p.stat().st_size for p in graph_files(path))}
                  for role, path in self.graphs.items()}
        manifest = {"tool": "hgdeploy", "graphs": graphs, "recipe": self.info.get("recipe", {}).get("name"),
                    "plan": self.info.get("plan")}
        write_atomic(self.path / MANIFEST, to_json(manifest))
        return self.path / MANIFEST


def runs_twins(engine: Engine) -> bool:
    """Does the profile run graphs derived from the exports (fp16, fused) rather than the exports themselves?"""
    return engine.precision == "fp16" or engine.fused_attention


def twin_role(source: str, precision: str, fused: bool) -> str:
    """The role of the graph a profile runs in place of `source` ("baseline" or "patched")."""
    if fused:
        return (FUSED_FP16_TWINS if precision == "fp16" else FUSED_TWINS)[source]
    return FP16_TWINS[source] if precision == "fp16" else source


# Recipe values whose absence means a value: set or not, the export is the same.
UNSET_MEANS = {"model.batch": 1}


def recipe_difference(recorded: JsonObject, now: JsonObject) -> tuple[str, JsonValue, JsonValue] | None:
    """The first recipe value (section.key, as exported, as asked now) that differs; [ci], [eval] and [tuned] (a
    tuned file's origin and folder name) do not change an export and do not count."""
    for section in sorted((set(recorded) | set(now)) - {"ci", "eval", "tuned"}):
        old, new = recorded.get(section, {}), now.get(section, {})
        for key in sorted(set(old) | set(new)):
            default = UNSET_MEANS.get(f"{section}.{key}")
            if old.get(key, default) != new.get(key, default):
                return f"{section}.{key}", old.get(key), new.get(key)
    return None


def _shown(value: JsonValue) -> str:
    return "(not set)" if value is None else repr(value)
