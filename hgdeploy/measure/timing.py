"""Latency: warm-up, then runners measured interleaved in one run; medians and percentiles.

Timings on shared machines drift; measuring every runner in every round (in rotating order) and
comparing medians as a ratio cancels most of that drift.
"""

from __future__ import annotations

import os
import platform
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

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms, "runs": self.runs}


def summarize(seconds: list[float]) -> Timing:
    ms = np.asarray(seconds) * 1e3
    return Timing(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()), len(ms))


def time_interleaved(runners: dict[str, BaseRunner], feed: dict[str, np.ndarray], warmup: int, runs: int,
                      on_round: Callable[[int], None] | None = None,
                      infer_kwargs: dict[str, bool] | None = None,
                      feeds: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Timing]:
    """Median/p90 latency of each runner; every round runs each runner once, order rotating.

    infer_kwargs go to every runner's infer (e.g. copy_outputs_to_host=False for device-resident timing);
    feeds: a feed of its own for some runners (a model at another input size), `feed` for the others.
    """
    kwargs = infer_kwargs or {}
    names = list(runners)
    fed = {n: (feeds or {}).get(n, feed) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
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
    return {n: summarize(t) for n, t in times.items()}


def machine_info() -> JsonObject:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version()}
