"""A heavy step in a fresh process of its own, for the big models.

glibc does not hand a big step's freed heap back whole: after the export of SwinV2-L at 544 px (its tensors,
protobufs and traced programs freed, malloc_trim called, resident memory back to 2.0 GB) every later step of the
same process peaked 2-2.7 GB higher than in a fresh one (the parity step 8.4 GB instead of 5.9). Only a process's
end gives everything back, so `run` exports and checks a big model each in a process of its own (Python's spawn:
nothing of this process's heap is inherited) while this one waits, holding no model.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, TypeVar

from hgdeploy.core.errors import UserError
from hgdeploy.core.memory import STEPS, StepPeak, peak_rss_mb, rss_mb

R = TypeVar("R")
STOP_S = 30  # after Ctrl-C (or an error here), how long the child may take to clean up before it is killed


@dataclass(frozen=True)
class ChildPeak:
    """What a step run in its own process needed: its own peak, and the peak of the two processes together
    (this one waits at a constant size meanwhile, so the sum of that size and the child's peak is exact)."""

    step: str
    peak_gb: float
    summed_gb: float


CHILD_PEAKS: list[ChildPeak] = []  # this command's steps run in their own processes, in order


def _child(send: Connection, fn: Callable[..., R], args: tuple) -> None:
    from hgdeploy.core.progress import quiet_libraries

    quiet_libraries()
    try:
        result = fn(*args)
    except BaseException as exc:  # a UserError, Ctrl-C or a bug: raised again in the parent
        if not isinstance(exc, (UserError, KeyboardInterrupt)):
            traceback.print_exc()
        send.send((False, exc, STEPS.finished, peak_rss_mb()))
        return
    send.send((True, result, STEPS.finished, peak_rss_mb()))


def in_fresh_process(step: str, fn: Callable[..., R], *args: object) -> R:
    """`fn(*args)` in a fresh Python process; returns its result or raises its exception here. `fn` and `args`
    must pickle (a module-level function; recipes, profiles, photos and paths do). The child's steps join this
    process's record (report.json's memory.steps), and its peak is kept in CHILD_PEAKS under `step`."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, args), name=f"hgdeploy-{step}")
    waiting_mb = rss_mb()
    child.start()
    send.close()
    try:
        with receive:
            ok, value, steps, peak_mb = receive.recv()
    except EOFError:
        child.join()
        how = "killed (out of memory?)" if child.exitcode == -signal.SIGKILL else f"exit code {child.exitcode}"
        raise RuntimeError(f"the {step} step's process ended without a result: {how}") from None
    except BaseException:  # Ctrl-C here (the child has its own), or an error while waiting
        _stop(child)
        raise
    child.join()
    STEPS.finished.extend(steps)
    CHILD_PEAKS.append(ChildPeak(step, peak_mb / 1024, (peak_mb + waiting_mb) / 1024))
    if not ok:
        raise value
    return value


def _stop(child: multiprocessing.process.BaseProcess) -> None:
    """Let the child end: a Ctrl-C reaches it too, and it removes what it staged on the way out; one still running
    after a moment (this process was interrupted alone) is interrupted the same way, then killed after STOP_S."""
    child.join(2)
    if child.is_alive() and child.pid is not None:
        os.kill(child.pid, signal.SIGINT)
        child.join(STOP_S)
    if child.is_alive():
        child.kill()
        child.join()
