"""Handing memory back to the operating system between the steps that hold gigabytes, and reading how much
the process holds."""

from __future__ import annotations

import ctypes
import functools
import gc
import resource
import sys
from pathlib import Path
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise).

    An export of a ViT-L builds several gigabytes of temporary tensors and protobufs; without this the
    process keeps their pages and the step that follows (an ONNX Runtime session, the fp16 conversion of a
    ViT-H) comes on top of them.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def releases_memory(step: Callable[P, R]) -> Callable[P, R]:
    """`step`, followed by release_memory once its locals (the graphs it loaded and made) are gone."""

    @functools.wraps(step)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        finally:
            release_memory()

    return wrapper


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Resident memory now (Linux); elsewhere the peak so far. The allocators warm up over the first images
    (the peak settles after a dozen), so "flat" is judged on the memory in use, not on the peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / (1 << 20)
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
