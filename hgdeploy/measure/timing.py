"""Latency: warm-up, then runners measured interleaved in one run; medians and percentiles, each round's time,
the speed-up's confidence interval and the machine's load around the run.

Timings on shared machines drift; measuring every runner in every round (in rotating order) and
comparing medians as a ratio cancels most of that drift. What is left shows in the rounds: the ratio of two
runners within one round varies from round to round, and a bootstrap of those per-round ratios gives the
interval a verdict reads ("faster" only when all of it lies above 1).
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import numpy as np
from polygraphy.backend.base import BaseRunner

from hgdeploy.core.files import JsonObject


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    rounds_ms: tuple[float, ...] = ()  # each interleaved round's time, in round order (paired across runners)

    def to_dict(self) -> dict[str, float | list[float]]:
        out: dict[str, float | list[float]] = {"median_ms": self.median_ms, "p90_ms": self.p90_ms,
                                               "min_ms": self.min_ms, "runs": self.runs}
        return out | ({"rounds_ms": list(self.rounds_ms)} if self.rounds_ms else {})


def summarize(seconds: list[float]) -> Timing:
    ms = np.asarray(seconds) * 1e3
    return Timing(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()), len(ms),
                  tuple(float(x) for x in ms))


# The speed-up's interval: a percentile bootstrap of the median per-round ratio, seeded so that the same rounds
# always give the same interval. Fewer rounds than MIN_ROUNDS give none: with 3 rounds all three ratios land
# above 1 one time in eight by chance alone.
CI_LEVEL = 0.95
CI_RESAMPLES = 2000
CI_SEED = 0
MIN_ROUNDS = 5


def speedup_interval(baseline_ms: list[float] | tuple[float, ...], patched_ms: list[float] | tuple[float, ...],
                     level: float = CI_LEVEL, resamples: int = CI_RESAMPLES,
                     seed: int = CI_SEED) -> tuple[float, float] | None:
    """The `level` confidence interval of the speed-up baseline / patched from interleaved rounds: round i's
    ratio baseline_ms[i] / patched_ms[i] (both ran in the same round, so drift between rounds cancels), the
    median of `resamples` bootstrap resamples of those ratios, and the central `level` of those medians. None
    with fewer than MIN_ROUNDS rounds (or rounds that do not pair up)."""
    b, p = np.asarray(baseline_ms, dtype=np.float64), np.asarray(patched_ms, dtype=np.float64)
    if b.shape != p.shape or b.ndim != 1 or len(b) < MIN_ROUNDS:
        return None
    ratios = b / p
    picks = np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))
    medians = np.median(ratios[picks], axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return float(low), float(high)


BUSY_MARGIN = 0.5  # busy: other processes kept more than (CPU count - this) cores' worth of tasks runnable


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system keeps none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class Load:
    """The machine's load around one interleaved run: the 1-minute load average when timing began and when it
    ended, the cores this process itself kept busy meanwhile (its own part of that load) and the CPU count.
    A load average is a mean over the last minute of runnable tasks, ours included: what others ran is read as
    the load less our own share, at the busier end."""

    start: float | None
    end: float | None
    own: float
    cpus: int

    @property
    def others(self) -> float | None:
        readings = [x for x in (self.start, self.end) if x is not None]
        return max(0.0, max(readings) - self.own) if readings else None

    @property
    def busy(self) -> bool:
        others = self.others
        return others is not None and others > self.cpus - BUSY_MARGIN

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"start": self.start, "end": self.end, "own_cores": round(self.own, 2), "cpus": self.cpus,
                "others": None if self.others is None else round(self.others, 2), "busy": self.busy}


class Timings(dict[str, Timing]):
    """Each runner's timing from one interleaved run, by name, and the machine's load around that run."""

    def __init__(self, timings: dict[str, Timing], load: Load | None = None):
        super().__init__(timings)
        self.load = load


def time_interleaved(runners: dict[str, BaseRunner], feed: dict[str, np.ndarray], warmup: int, runs: int,
                      on_round: Callable[[int], None] | None = None,
                      infer_kwargs: dict[str, bool] | None = None,
                      feeds: dict[str, dict[str, np.ndarray]] | None = None) -> Timings:
    """Median/p90 latency of each runner; every round runs each runner once, order rotating. The timings keep
    every round's time, and the load average is read before the warm-up and after the last round.

    infer_kwargs go to every runner's infer (e.g. copy_outputs_to_host=False for device-resident timing);
    feeds: a feed of its own for some runners (a model at another input size), `feed` for the others.
    """
    kwargs = infer_kwargs or {}
    names = list(runners)
    fed = {n: (feeds or {}).get(n, feed) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    start, cpu0, wall0 = load_average(), time.process_time(), time.perf_counter()
    with ExitStack() as stack:
        for runner in runners.values():
            stack.enter_context(runner)
        for _ in range(warmup):
            for name in names:
                runners[name].infer(fed[name], check_inputs=False, **kwargs)
        for r in range(runs):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                runners[name].infer(fed[name], check_inputs=False, **kwargs)
                times[name].append(runners[name].last_inference_time())
            if on_round:
                on_round(r + 1)
    own = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    load = Load(start, load_average(), own, os.cpu_count() or 1)
    return Timings({n: summarize(t) for n, t in times.items()}, load)


def machine_info() -> JsonObject:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version()}
