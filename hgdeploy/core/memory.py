"""Handing memory back to the operating system between the steps that hold gigabytes."""

from __future__ import annotations

import ctypes
import functools
import gc
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
