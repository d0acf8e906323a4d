"""Progress display on stderr (stdout stays clean for --json)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console

from hgdeploy.core.memory import STEPS
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)  # logs keep one line per message
_muted = [0]


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Steps inside this block print nothing: the inner steps of one step the user already sees."""
    _muted[0] += 1
    try:
        yield
    finally:
        _muted[0] -= 1


@contextlib.contextmanager
def step(description: str, total: int | None = None) -> Iterator:
    """A progress line for one slow step; yields `advance(n=1)`. Prints the elapsed time when done."""
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    start = time.perf_counter()
    if _muted[0]:
        yield lambda n=1: None
        return
    STEPS.begin(description)
    try:
        if not console.is_terminal:  # logs and CI: one line per finished step, no live display
            yield lambda n=1: None
        else:
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task(description, total=total)
                yield lambda n=1: progress.advance(task, n)
    finally:
        done = STEPS.end()
    memory = f", peak {done.peak_gb:.1f} GB" if done else ""
    console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - start:.1f} s{memory})[/dim]")


def info(message: str, markup: bool = True) -> None:
    """A line on stderr; markup=False for text with brackets of its own ("[3/8]", "[cluster]")."""
    console.print(message, markup=markup)


def quiet_libraries() -> None:
    """Polygraphy and graph-surgeon log to stdout at INFO/WARNING; the CLI (and every process a command starts)
    shows its own progress on stderr and keeps stdout for results. (ONNX Runtime is quieted where its sessions
    are made.)"""
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    GS_LOGGER.severity = GS_LOGGER.ERROR
