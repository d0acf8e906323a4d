"""The latency phase of `hgdeploy tune`: the rows worth timing, taken down the one export road
(`pipeline.road.write_deployable`: export, graph passes, the profile's precision) and timed with the engine
profile in groups interleaved with the unpatched model, so every speed-up is a ratio measured in one run.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
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
from hgdeploy.tune.ledger import Ledger, Row
from hgdeploy.tune.report import plan_text
from hgdeploy.tune.select import select_best, to_time

GROUP = 4  # plans timed per interleaved run with the unpatched model


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


def time_group(ctx: Context, group: list[Row], models_for: dict[str, Callable[[], nn.Module]], base_graph: Path,
               folder: Path, what: str) -> dict[str, Timing]:
    """One interleaved run: the group's graphs and the unpatched graph, timed together."""
    graphs: dict[str, Path] = {}
    with progress.step(f"Exporting {len(group)} plans (ONNX, graph passes)"), progress.muted():
        for j, row in enumerate(group):
            graphs[row.key] = export_graph(ctx, row, models_for[row.key](), folder / f"g{j}")
    runners = {"baseline": make_runner(base_graph, ctx.engine)}
    runners |= {key: make_runner(path, ctx.engine) for key, path in graphs.items()}
    feeds = {k: engines.zeros_feed(p) for k, p in graphs.items()}
    return engines.time_runners(runners, engines.zeros_feed(base_graph), ctx.engine, feeds, what=what)


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


def latency_phase(ctx: Context, ledger: Ledger, models_for: dict[str, Callable[[], nn.Module]], timed: int,
                  limit_s: float) -> None:
    """Time the chosen rows GROUP at a time until done or until the next group would pass --time-limit."""
    assert ledger.baseline is not None
    queue = [r for r in to_time(ledger.rows, ledger.budget, ledger.baseline.gflops, timed) if r.key in models_for]
    if not queue:
        return
    progress.info(f"Timing {len(queue)} plans on {ctx.engine.name}, {GROUP} at a time interleaved with the "
                  f"unpatched model")
    group_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hgdeploy-tune-") as tmp:
        with progress.step("Exporting the unpatched model"), progress.muted():
            base, _ = write_deployable(ctx.models, ctx.example, ctx.engine, Path(tmp) / "baseline",
                                       roles=("baseline",))
        for start in range(0, len(queue), GROUP):
            if ledger.elapsed() + max(group_s, default=0.0) > limit_s:
                ledger.stopped = f"--time-limit reached: {len(queue) - start} of {len(queue)} plans were not timed"
                progress.info(f"note: {ledger.stopped}")
                return
            began, group = time.monotonic(), queue[start:start + GROUP]
            timings = time_group(ctx, group, models_for, base.baseline_graph(ctx.engine), Path(tmp) / f"group{start}",
                                 what=f"plans {start + 1}-{start + len(group)} of {len(queue)} and the unpatched model")
            record(ledger, group, timings)
            group_s.append(time.monotonic() - began)
