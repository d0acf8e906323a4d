"""Export recipes: one TOML per model configuration, validated against a fixed schema.

A recipe names the model (family, checkpoint, input size), how images are prepared, and the
clustering plan. `--set section.key=value` overrides a value; unknown sections or keys are an
error with a suggestion, never silently ignored.
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hgdeploy.core.config import bundled_folders, check_key, resolve_toml
from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import PlanRequest, parse_grid
from hgdeploy.core.preprocess import RESIZE_MODES, Preprocess

# A recipe value as TOML gives it (recipes hold no dates and no tables below their sections), and a section.
Value = str | int | float | bool | list["Value"]
Section = dict[str, Value]

BUNDLED_RECIPES = bundled_folders("export")
DEFAULT_RECIPE = "dinov2_s14_focus"

# section -> key -> accepted Python types. The single source of truth for what a recipe may say.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {
        "family": (str,), "checkpoint": (str,), "input_size": (str, int, list),
        # images per engine run: the exported graphs' static batch (default 1), or "dynamic" (a batch axis)
        "batch": (int, str),
        # family options (each family accepts its own subset, see `hgdeploy families`):
        "arch": (str,), "num_classes": (int,), "decoder": (str,), "decoder_layers": (int,),
    },
    "preprocess": {"resize": (str,), "mean": (list,), "std": (list,)},
    "cluster": {
        "alpha": (int,), "grid": (str, int, list), "reconstruct_after": (int,), "neighbours": (int,),
        "iters": (int,), "tau": (float, int, str), "k": (int,), "reconstruction": (str,), "form": (str,),
        "reconstruct_on": (str,), "reconstruct_from": (str,), "method": (str,),
    },
    # How `hgdeploy eval` runs and reads the model on a dataset (no effect on the export).
    "eval": {"depth_output": (str,), "window_stride": (int,), "disparity_scale": (float, int),
             "disparity_shift": (float, int)},
    # --set overrides that give the recipe's small CI shape (tests export every recipe at it).
    "ci": {"set": (list,)},
    # Written by `hgdeploy tune` into best.toml: the recipe it was tuned from, and the name (runs/<name>) the
    # commands use for this file's default folder in place of the file's stem ("best").
    "tuned": {"recipe": (str,), "name": (str,)},
}
REQUIRED = {"model": ("family", "input_size"), "cluster": ("alpha", "grid")}
# [model] keys every family takes; the others are family options.
GENERIC_MODEL_KEYS = ("family", "checkpoint", "input_size", "batch")
MAX_BATCH = 1024
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DYNAMIC, DYNAMIC_EXAMPLE = "dynamic", 2


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the TOML as written (`data`, reported as is) and its values parsed once."""

    path: str
    name: str
    data: dict[str, Section]
    input_size: tuple[int, int]
    request: PlanRequest  # the [cluster] section; `plan.make_plan` turns it into a plan for a loaded model

    @property
    def family(self) -> str:
        return self.data["model"]["family"]

    @property
    def checkpoint(self) -> str | None:
        return self.data["model"].get("checkpoint")

    @property
    def options(self) -> Section:
        """The family-specific [model] keys."""
        return {k: v for k, v in self.data["model"].items() if k not in GENERIC_MODEL_KEYS}

    @property
    def dynamic_batch(self) -> bool:
        """model.batch = "dynamic": the graphs take any batch on their first axis (ONNX Runtime)."""
        return self.data["model"].get("batch") == DYNAMIC

    @property
    def batch(self) -> int:
        """Images per run of the tool's own (export example, check, bench): model.batch, or DYNAMIC_EXAMPLE for a
        dynamic batch (an example of 1 would let the exporter fix the axis to 1)."""
        return DYNAMIC_EXAMPLE if self.dynamic_batch else int(self.data["model"].get("batch", 1))

    def with_batch(self, batch: int) -> Recipe:
        """The same recipe exported at another batch (what `bench --batch` times)."""
        data = copy.deepcopy(self.data)
        data["model"]["batch"] = batch
        return replace(self, data=data)

    @property
    def ci_overrides(self) -> list[str]:
        return list(self.data.get("ci", {}).get("set", []))

    def preprocess(self, defaults: Preprocess) -> Preprocess:
        """The family's preprocessing for these weights, with what the recipe's [preprocess] says on top."""
        p = self.data.get("preprocess", {})
        return Preprocess(
            size=self.input_size,
            resize=p.get("resize", defaults.resize),
            mean=tuple(p.get("mean", defaults.mean)),
            std=tuple(p.get("std", defaults.std)),
        )


def resolve_recipe_path(name_or_path: str | None) -> Path:
    """A path as given, or a bundled recipe by name ("dinov2_s14_focus" or "export/dinov2_s14_focus.toml")."""
    return resolve_toml(name_or_path, DEFAULT_RECIPE, BUNDLED_RECIPES, "export", "recipe file")


def bundled_recipes() -> dict[str, str]:
    """name -> family of every recipe shipped with hgdeploy (the first folder that has a name wins)."""
    found: dict[str, str] = {}
    for folder in BUNDLED_RECIPES:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                found.setdefault(path.stem, tomllib.loads(path.read_text())["model"]["family"])
            except (OSError, KeyError, tomllib.TOMLDecodeError):
                continue
    return found


def parse_override(text: str) -> tuple[str, str, Any]:
    """"cluster.tau=0.5" -> ("cluster", "tau", 0.5). Values are read as TOML, else kept as strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r} must look like section.key=value, e.g. cluster.tau=0.5")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _check_key(section: str, key: str | None, where: str) -> None:
    check_key(SCHEMA, section, key, where)


def validate_data(data: dict[str, Section], where: str) -> None:
    """Every section and key known, every value of an accepted type, required keys present."""
    for section, body in data.items():
        _check_key(section, None, where)
        if not isinstance(body, dict):
            raise UserError(f"{where}: [{section}] must be a table")
        for key, value in body.items():
            _check_key(section, key, where)
            types = SCHEMA[section][key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise UserError(f"{where}: {section}.{key} = {value!r} must be {names}")
    for section, keys in REQUIRED.items():
        for key in keys:
            if key not in data.get(section, {}):
                raise UserError(f"{where}: missing required key {section}.{key}")
    pre = data.get("preprocess", {})
    if pre.get("resize", "bilinear") not in RESIZE_MODES:
        raise UserError(f"{where}: preprocess.resize must be one of {', '.join(RESIZE_MODES)}")
    for key in ("mean", "std"):
        if key in pre and (len(pre[key]) != 3 or not all(isinstance(v, (int, float)) for v in pre[key])):
            raise UserError(f"{where}: preprocess.{key} must be three numbers")
    if any(v <= 0 for v in pre.get("std", [1])):
        raise UserError(f"{where}: preprocess.std must be positive")
    ev = data.get("eval", {})
    if ev.get("depth_output", "metric") not in ("metric", "disparity"):
        raise UserError(f"{where}: eval.depth_output must be metric (metres) or disparity (relative inverse depth)")
    if ("disparity_scale" in ev) != ("disparity_shift" in ev):
        raise UserError(f"{where}: eval.disparity_scale and eval.disparity_shift go together (depth = 1 / (scale x "
                        f"output + shift)); give both, or neither for a least-squares fit per image")
    if ev.get("window_stride", 1) < 1:
        raise UserError(f"{where}: eval.window_stride must be a positive number of pixels")
    name = data.get("tuned", {}).get("name")
    if name is not None and not FOLDER_NAME.fullmatch(name):
        raise UserError(f"{where}: tuned.name = {name!r} must be a folder name (letters, digits, '.', '_', '-')")
    ci = data.get("ci", {}).get("set", [])
    if not all(isinstance(v, str) for v in ci):
        raise UserError(f"{where}: ci.set must be a list of 'section.key=value' strings")


def read_recipe_file(path: Path) -> dict[str, Section]:
    """The recipe file's TOML (its sections, checked by validate_data next): the one place it is read (a command
    reads its recipe once)."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from exc


def load_recipe(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raises UserError naming the first problem."""
    path = resolve_recipe_path(name_or_path)
    data = read_recipe_file(path)
    validate_data(data, str(path))
    data = copy.deepcopy(data)
    for text in overrides:
        section, key, value = parse_override(text)
        _check_key(section, key, f"--set {text}")
        data.setdefault(section, {})[key] = value
    validate_data(data, f"{path} with --set")
    batch = data["model"].get("batch", 1)
    if batch != DYNAMIC and not (isinstance(batch, int) and 1 <= batch <= MAX_BATCH):
        raise UserError(f"model.batch = {batch!r} in {path}: give the images per engine run, 1 to {MAX_BATCH}, or "
                        f'"{DYNAMIC}" for a batch axis')
    # Parsed now, once: a bad size or grid fails before any model is loaded.
    return Recipe(path=str(path), name=data.get("tuned", {}).get("name", path.stem), data=data,
                  input_size=parse_grid(data["model"]["input_size"], "model.input_size"),
                  request=PlanRequest.from_section(data["cluster"]))
