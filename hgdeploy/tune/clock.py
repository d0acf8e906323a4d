"""How `hgdeploy tune` spends --time-limit: what each kind of step has cost so far, and whether the next one fits.

The run measures its own steps (a plan scored, a graph exported, a graph's share of a timing run, the unpatched
pass over the photos, a model loaded) and keeps the largest cost of each kind. A phase takes its next step only
when that step's cost and the time kept for the later phases both fit before the limit: the fidelity phase keeps
what the cheapest plans' baselines, their timing, the held-out check and the files will cost, so the run ends near
--time-limit with the equal-cost comparison measured. Costs are saved in tune.json: a resumed run that has nothing
left to measure them on estimates with the earlier run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Iterator

GROUP = 4  # plans timed per interleaved run with the unpatched model
# Before anything of a kind was measured: writing tune.md, tune.png and best.toml (seconds).
FILES_S = 2.0
# Kinds of steps: the model loaded (load), the unpatched pass over the photos (cache), a plan scored (score), a
# downscaled input's GFLOPs counted (count), the smallest size with a plan's GFLOPs found (size), a downscaled input
# scored (down), a graph exported (export), a graph's share of a timing run (time), the held-out check (holdout),
# tune.md, tune.png and best.toml written (files).
COST_KINDS = ("load", "cache", "score", "count", "size", "down", "export", "time", "holdout", "files")


@dataclasses.dataclass
class Clock:
    """The limit, when the run started (the command's start: loading counts), and the costs measured.

    costs: this run's largest cost of each kind (seconds); earlier: the costs an earlier run in the same folder
    saved, used for a kind this run has not measured yet.
    """

    limit_s: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    costs: dict[str, float] = dataclasses.field(default_factory=dict)
    earlier: dict[str, float] = dataclasses.field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, kind: str, seconds: float) -> None:
        self.costs[kind] = max(self.costs.get(kind, 0.0), seconds)

    @contextlib.contextmanager
    def measure(self, kind: str, share: int = 1) -> Iterator[None]:
        """Record the block's duration (divided by `share`: one graph's part of a timing run of several)."""
        began = time.monotonic()
        yield
        self.record(kind, (time.monotonic() - began) / max(share, 1))

    def cost(self, kind: str, default: float | None = None) -> float:
        """The largest measured cost of one step of this kind (this run's, else the earlier run's), else
        `default` (files: FILES_S; others 0)."""
        if kind in self.costs:
            return self.costs[kind]
        if kind in self.earlier:
            return self.earlier[kind]
        if default is not None:
            return default
        return FILES_S if kind == "files" else 0.0

    def fits(self, seconds: float, keep: float = 0.0) -> bool:
        """Whether a step of `seconds` still ends before the limit with `keep` seconds left for later phases."""
        return self.elapsed() + seconds + keep <= self.limit_s

    def saved(self) -> dict[str, float]:
        """What tune.json keeps: this run's costs over the earlier run's."""
        return {k: round(v, 3) for k, v in (self.earlier | self.costs).items()}

    # ------------------------------------------------------------------------------ estimates of later phases

    def timing_s(self, rows: int, baseline_exported: bool = True) -> float:
        """Timing `rows` rows GROUP at a time: each exported once, each group's graphs and the unpatched one run."""
        if rows <= 0:
            return 0.0
        groups = math.ceil(rows / GROUP)
        return ((0.0 if baseline_exported else self.cost("export")) + rows * self.cost("export")
                + (rows + groups) * self.cost("time"))

    def final_s(self, holdout_images: int, images: int) -> float:
        """The held-out check (the unpatched pass and the best plan on those images) and the files."""
        holdout = 0.0
        if holdout_images:
            share = holdout_images / max(images, 1)  # the unpatched pass and one plan scored, on those images
            holdout = self.cost("holdout", (self.cost("cache") + self.cost("score")) * share)
        return holdout + self.cost("files")
