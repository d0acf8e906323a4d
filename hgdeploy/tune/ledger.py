"""What one `hgdeploy tune` run has measured: typed rows in a ledger that tune.json serialises, in one place.

A row is one measured plan: kind "clustering", "pool_bilinear" or "downscale", its [cluster] values (or the
input size), GFLOPs, fidelity on the tuning images and, when timed, latency and speed-up against the unpatched
model timed interleaved with it. The ledger is rewritten to tune.json after every measured row, so Ctrl-C keeps
what was measured, and the same command with the same folder resumes from it: the earlier run's scored rows are
the new ledger's first rows, and a phase measures only what no row holds yet (rows are found by key).

Plans a run did not measure are listed apart, by why: `pruned` (a larger grid at the same alpha already missed the
budget, or not a valid plan for the model) and `skipped` (skipped for time: --time-limit left no room to score or
to time them; a resumed run tries them again).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject, to_json, write_atomic
from hgdeploy.tune.clock import Clock
from hgdeploy.tune.space import Budget, parse_budget

KINDS = ("clustering", "pool_bilinear", "downscale")
# Keys a row has only once it is timed (or checked on held-out images): left out of tune.json until then.
TIMED_KEYS = ("latency_ms", "latency", "baseline_latency_ms", "speedup", "speedup_ci", "holdout")


@dataclasses.dataclass
class Row:
    """One measured plan (mutable: timing and the held-out check fill it in after scoring)."""

    key: str
    kind: str
    plan: JsonObject
    gflops: float
    fidelity: JsonObject | None
    baseline: bool = False
    recipe: bool = False
    latency_ms: float | None = None
    latency: JsonObject | None = None
    baseline_latency_ms: float | None = None
    speedup: float | None = None
    speedup_ci: list[float] | None = None  # the speed-up's 95 % interval from the rounds (measure.timing)
    holdout: JsonObject | None = None

    def to_json(self) -> JsonObject:
        out: JsonObject = {"key": self.key, "kind": self.kind, "baseline": self.baseline, "recipe": self.recipe,
                           "plan": self.plan, "gflops": self.gflops, "fidelity": self.fidelity}
        return out | {k: getattr(self, k) for k in TIMED_KEYS if getattr(self, k) is not None}

    @classmethod
    def from_json(cls, data: JsonObject) -> Row:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def reusable(self) -> bool:
        """A row of an earlier run that can stand: scored, with the per-image values a budget's bound needs."""
        return bool((self.fidelity or {}).get("per_image"))


@dataclasses.dataclass
class Unpatched:
    gflops: float
    latency_ms: float | None = None


@dataclasses.dataclass
class Ledger:
    """tune.json's content: the run's context and settings, every row, the pruned plans and the conclusions."""

    context: JsonObject
    budget: Budget
    space: JsonObject
    backend: JsonObject
    folder: Path
    rows: list[Row] = dataclasses.field(default_factory=list)
    pruned: list[JsonObject] = dataclasses.field(default_factory=list)
    skipped: list[JsonObject] = dataclasses.field(default_factory=list)
    resumed_rows: int = 0
    downscale_gflops: dict[str, float] = dataclasses.field(default_factory=dict)
    state: str = "running"
    baseline: Unpatched | None = None
    best: Row | None = None
    comparison: list[JsonObject] | None = None
    structure_check_only: str | None = None
    stopped: str | None = None
    elapsed_s: float = 0.0
    costs: dict[str, float] = dataclasses.field(default_factory=dict)
    limit_s: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    clock: Clock | None = None  # the run's clock: its elapsed time and measured costs go into tune.json

    def elapsed(self) -> float:
        """Seconds since this run started (a resumed run counts its own time)."""
        return self.clock.elapsed() if self.clock is not None else time.monotonic() - self.started

    def row(self, key: str) -> Row | None:
        """The row measured under `key` (scored, with its per-image values), or None: what a phase asks before it
        builds or scores anything, so that no row is measured twice."""
        found = next((r for r in self.rows if r.key == key), None)
        return found if found is not None and found.reusable() else None

    def add(self, row: Row) -> Row:
        """Record a measured row (replacing one with its key) and save: an interrupted sweep keeps it."""
        self.rows = [r for r in self.rows if r.key != row.key] + [row]
        self.save()
        return row

    def prune(self, key: str, plan: JsonObject, reason: str) -> None:
        self.pruned.append({"key": key, "plan": plan, "reason": reason})

    def skip(self, kind: str, key: str | None, plan: JsonObject, phase: str) -> None:
        """A plan or baseline --time-limit left no room for: not scored (phase "scoring") or scored but not timed
        (phase "timing")."""
        self.skipped.append({"key": key, "kind": kind, "plan": plan, "phase": phase,
                             "reason": f"skipped for time: not {'scored' if phase == 'scoring' else 'timed'} "
                                       f"within --time-limit"})

    def skipped_count(self, phase: str) -> int:
        return sum(1 for s in self.skipped if s["phase"] == phase)

    def recipe_row(self) -> Row | None:
        return next((r for r in self.rows if r.recipe), None)

    def save(self) -> None:
        """tune.json alone, after every measured row."""
        self.elapsed_s = self.elapsed()
        if self.clock is not None:
            self.costs, self.limit_s = self.clock.saved(), self.clock.limit_s
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "tune.json", to_json(self.to_json()))

    def to_json(self) -> JsonObject:
        out: JsonObject = {"tool": "hgdeploy tune", "state": self.state, "context": self.context,
                           "budget": str(self.budget), "confidence": self.budget.confidence, "space": self.space,
                           "backend": self.backend, "rows": [r.to_json() for r in self.rows],
                           "pruned": self.pruned, "skipped": self.skipped,
                           "best": self.best.to_json() if self.best else None,
                           "resumed_rows": self.resumed_rows, "downscale_gflops": self.downscale_gflops}
        if self.structure_check_only:
            out["structure_check_only"] = self.structure_check_only
        if self.baseline is not None:
            out["baseline"] = dataclasses.asdict(self.baseline)
        if self.stopped:
            out["stopped"] = self.stopped
        if self.comparison is not None:
            out["comparison"] = self.comparison
        if self.limit_s is not None:
            out["time_limit_s"] = self.limit_s
        return out | {"elapsed_s": self.elapsed_s, "costs": self.costs}

    @classmethod
    def from_json(cls, data: JsonObject, folder: Path) -> Ledger:
        """A tune.json read back (KeyError or TypeError when it is not one); the best row is one of the rows."""
        rows = [Row.from_json(r) for r in data["rows"]]
        best = next((r for r in rows if data.get("best") and r.key == data["best"]["key"]), None)
        base = data.get("baseline")
        return cls(context=data["context"], budget=parse_budget(data["budget"], data["confidence"]),
                   space=data["space"], backend=data["backend"], folder=folder, rows=rows,
                   pruned=list(data["pruned"]), skipped=list(data.get("skipped", [])),
                   resumed_rows=data.get("resumed_rows", 0),
                   downscale_gflops=dict(data.get("downscale_gflops", {})), state=data["state"],
                   baseline=Unpatched(**base) if base else None, best=best, comparison=data.get("comparison"),
                   structure_check_only=data.get("structure_check_only"), stopped=data.get("stopped"),
                   elapsed_s=data.get("elapsed_s", 0.0), costs=dict(data.get("costs", {})),
                   limit_s=data.get("time_limit_s"))


def earlier(folder: Path, context: JsonObject) -> Ledger | None:
    """An earlier run's ledger in `folder` to resume (None without one), refused when it tuned something else."""
    path = folder / "tune.json"
    if not path.is_file():
        return None
    try:
        old = Ledger.from_json(json.loads(path.read_text()), folder)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a tune.json this version can resume; choose another --out or remove it") \
            from None
    for part, what in (("recipe", "recipe values"), ("images", "images"), ("engine", "engine profile")):
        if old.context.get(part) != context[part] or (part == "recipe"
                                                      and old.context.get("values") != context["values"]):
            raise UserError(f"{folder} holds a tune run with other {what}; rerun with the same ones to resume, or "
                            f"choose another --out")
    return old
