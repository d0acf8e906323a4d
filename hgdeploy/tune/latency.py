"""The latency phase of `hgdeploy tune`: the rows worth timing, taken down the one export road
(`pipeline.road.write_deployable`: export, graph passes, the profile's precision) and timed with the engine
profile in groups interleaved with the unpatched model, so every speed-up is a ratio measured in one run.

A `Bench` exports the unpatched graph once and times groups against it, measuring on the run's clock what one
export and one graph's share of a timing run cost: the first group (the recipe's plan alone, timed before the
sweep) gives the estimates the time kept for the later phases rests on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hgdeploy.backends import make_runner
from hgdeploy.core import progress
from hgdeploy.core.plan import parse_grid
from hgdeploy.measure.report import speedup_text
from hgdeploy.measure.timing import Timing, speedup_interval
from hgdeploy.pipeline import engines
from hgdeploy.pipeline.context import Context
from hgdeploy.pipeline.road import write_deployable
from hgdeploy.tune.clock import GROUP, Clock
from hgdeploy.tune.ledger import Ledger, Row
from hgdeploy.tune.report import plan_text
from hgdeploy.tune.select import select_best


def export_graph(ctx: Context, row: Row, model: nn.Module, folder: Path) -> Path:
    """What the profile's engine runs for one row, from the export road: a downscaled input as a baseline
    graph; a plan as a patched graph with the graph passes; both in the profile's precision."""
    engine = ctx.engine
    if row.kind == "downscale":
        example = torch.zeros(1, 3, *parse_grid(row.plan["input_size"]))
        export, _ = write_deployable(dataclasses.replace(ctx.models, baseline=model), example, engine, folder,
                                     roles=("baseline",))
        return export.baseline_graph(engine)
    export, _ = write_deployable(dataclasses.replace(ctx.models, patched=model), ctx.example, engine, folder,
                                 {"plan": row.plan}, roles=("patched",))
    return export.patched_graph(engine)


@dataclasses.dataclass
class Bench:
    """Groups of rows timed against the unpatched graph (exported once, on first use) in `folder`."""

    ctx: Context
    ledger: Ledger
    clock: Clock
    folder: Path
    model_for: Callable[[Row], nn.Module]
    base_graph: Path | None = None
    groups: int = 0

    def baseline(self) -> Path:
        if self.base_graph is None:
            with progress.step("Exporting the unpatched model"), progress.muted(), self.clock.measure("export"):
                base, _ = write_deployable(self.ctx.models, self.ctx.example, self.ctx.engine,
                                           self.folder / "baseline", roles=("baseline",))
            self.base_graph = base.baseline_graph(self.ctx.engine)
        return self.base_graph

    def cost(self, rows: int) -> float:
        """The estimated seconds of timing `rows` more rows (the unpatched graph's export included if not done)."""
        return self.clock.timing_s(rows, self.base_graph is not None)

    def time(self, group: list[Row], what: str) -> None:
        """One interleaved run: the group's graphs and the unpatched graph, timed together, recorded in the rows."""
        base = self.baseline()
        self.groups += 1
        graphs: dict[str, Path] = {}
        with progress.step(f"Exporting {len(group)} plans (ONNX, graph passes)"), progress.muted():
            for j, row in enumerate(group):
                with self.clock.measure("export"):
                    graphs[row.key] = export_graph(self.ctx, row, self.model_for(row),
                                                   self.folder / f"group{self.groups}" / f"g{j}")
        with self.clock.measure("time", share=len(group) + 1):
            runners = {"baseline": make_runner(base, self.ctx.engine)}
            runners |= {key: make_runner(path, self.ctx.engine) for key, path in graphs.items()}
            feeds = {k: engines.zeros_feed(p) for k, p in graphs.items()}
            timings = engines.time_runners(runners, engines.zeros_feed(base), self.ctx.engine, feeds, what=what)
        record(self.ledger, group, timings)


def record(ledger: Ledger, group: list[Row], timings: dict[str, Timing]) -> None:
    """Each row's latency and speed-up against the unpatched model of the same run, with the speed-up's interval
    from their paired rounds."""
    base_ms = timings["baseline"].median_ms
    if ledger.baseline is not None:
        ledger.baseline.latency_ms = base_ms
    for row in group:
        t = timings[row.key]
        row.latency_ms, row.latency, row.baseline_latency_ms = t.median_ms, t.to_dict(), base_ms
        row.speedup = base_ms / t.median_ms
        ci = speedup_interval(timings["baseline"].rounds_ms, t.rounds_ms)
        row.speedup_ci = None if ci is None else list(ci)
        ledger.add(row)
        progress.info(f"  {row.kind} {plan_text(row)}: {speedup_text(row.speedup, ci, 3)} ({t.median_ms:.1f} ms vs "
                      f"{base_ms:.1f} ms)")
    best = select_best(ledger.rows, ledger.budget)
    progress.info(f"  best so far: {plan_text(best)}, {speedup_text(best.speedup, best.speedup_ci, 3)}"
                  if best and best.speedup
                  else "  best so far: none faster than the unpatched model within the budget")


def latency_phase(bench: Bench, must: list[Row], more: list[Row], keep: float) -> None:
    """Time `must` (the cheapest plans within the budget and their baselines: their time was kept) and then
    `more` (the recipe's plan, the next cheapest plans), GROUP at a time; a group of `more` rows runs only when
    its estimated cost and `keep` (the held-out check and the files) fit before --time-limit."""
    queue, reserved = [*must, *more], {r.key for r in must}
    if not queue:
        return
    progress.info(f"Timing {len(queue)} plans on {bench.ctx.engine.name}, {GROUP} at a time interleaved with the "
                  f"unpatched model ({len(must)} of them always: the cheapest within the budget and their baselines)")
    done = 0
    while done < len(queue):
        group = queue[done:done + GROUP]
        while group and group[-1].key not in reserved and not bench.clock.fits(bench.cost(len(group)), keep):
            group.pop()  # the extra rows that do not fit; reserved rows are always timed
        if not group:
            break
        bench.time(group, what=f"plans {done + 1}-{done + len(group)} of {len(queue)} and the unpatched model")
        done += len(group)
    for row in queue[done:]:
        bench.ledger.skip(row.kind, row.key, row.plan, "timing")
    if done < len(queue):
        progress.info(f"note: {len(queue) - done} of {len(queue)} plans skipped for time (not timed)")
