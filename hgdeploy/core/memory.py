"""Memory: handed back to the operating system between the steps that hold gigabytes, read (the process now, its
peak, each step's peak), and estimated before a heavy command starts, so that one that cannot fit is refused in
one line instead of thrashing the machine."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
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


def freeze_imports() -> None:
    """Move what the process holds now (the imported libraries' modules, functions and tables) out of the garbage
    collector's sight, once, before any model is built.

    Every full collection walks every tracked object: after torch, transformers, timm and the ONNX exporter are
    imported that is about 500 000 objects, 0.3 s a collection on 2 cores, and an export collects several times
    (release_memory, Python's own collections): 2.3 s of a 6 s tiny-model export, 0.2 s once frozen. Only before a
    model exists: a frozen object is still freed when its last reference goes, but never as part of a cycle, and
    the models are cycles (timm's and transformers' modules point back at their parents). Skipped where the
    process froze already (a test session freezes after collecting)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


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
    """This process's peak resident memory so far: Linux's VmHWM, the high-water mark of this program's own
    memory. getrusage's maxrss is not that: Linux carries it across exec, so a command started by a 2.6 GB
    process (a pytest worker; Python spawns with vfork) reported a 2.6 GB peak of its own. Elsewhere maxrss
    (macOS reports bytes)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Resident memory now (Linux); elsewhere the peak so far. The allocators warm up over the first images
    (the peak settles after a dozen), so "flat" is judged on the memory in use, not on the peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / (1 << 20)
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()


# ------------------------------------------------------------------------------------------- the machine

MEMORY_ENV = "HGDEPLOY_MEMORY_GB"  # the memory a command may plan with, in GB, instead of the machine's


def machine_memory_gb() -> tuple[float, str]:
    """(GB a command may use, where that figure comes from): $HGDEPLOY_MEMORY_GB when set (a smaller share of a
    shared machine, or a test's low limit), else the container's cgroup limit when it is below the machine's
    total memory, else the total."""
    set_by_user = os.environ.get(MEMORY_ENV)
    if set_by_user:
        try:
            value = float(set_by_user)
        except ValueError:
            value = 0.0
        if value <= 0:
            from hgdeploy.core.errors import UserError

            raise UserError(f"${MEMORY_ENV} = {set_by_user!r} is not a number of GB above 0 (e.g. 16)")
        return value, f"${MEMORY_ENV}"
    total = _meminfo_total_gb()
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) / 2**30 < total:
            return int(text) / 2**30, "the container's memory limit"
    return total, "the machine's memory"


def _meminfo_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


# ------------------------------------------------------------------------------ peaks of a command's steps

SAMPLE_S = 0.1  # how often the sampler reads the resident memory: steps last seconds to minutes


@dataclass
class StepPeak:
    """One finished step: its name, the most resident memory the process held during it, and how long it took."""

    step: str
    peak_gb: float
    seconds: float

    def to_json(self) -> dict[str, str | float]:
        return {"step": self.step, "peak_gb": round(self.peak_gb, 2), "seconds": round(self.seconds, 1)}


@dataclass
class _Open:
    step: str
    start: float
    maxrss_mb: float
    peak_mb: float = 0.0


class StepPeaks:
    """The resident-memory peak of every step a command takes (`progress.step` opens and closes them), so that
    report.json can show where the memory went and an estimate can be checked against it.

    A step's peak is exact when it set a new peak for the process (getrusage's maxrss grew during it); else it is
    the highest of readings a sampler thread takes every SAMPLE_S. The kernel's own high-water mark is never
    reset (/proc/self/clear_refs would also hide the process's peak from `/usr/bin/time`)."""

    def __init__(self) -> None:
        self._open: list[_Open] = []
        self.finished: list[StepPeak] = []
        self._lock = threading.Lock()
        self._sampler: threading.Thread | None = None

    def begin(self, step: str) -> None:
        now = rss_mb()
        with self._lock:
            self._open.append(_Open(step, time.perf_counter(), peak_rss_mb(), now))
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, name="hgdeploy-memory", daemon=True)
            self._sampler.start()

    def end(self) -> StepPeak | None:
        now, maxrss = rss_mb(), peak_rss_mb()
        with self._lock:
            if not self._open:
                return None
            for frame in self._open:
                frame.peak_mb = max(frame.peak_mb, now)
            frame = self._open.pop()
        peak = maxrss if maxrss > frame.maxrss_mb else frame.peak_mb
        done = StepPeak(frame.step, peak / 1024, time.perf_counter() - frame.start)
        self.finished.append(done)
        return done

    def _sample(self) -> None:
        while True:
            time.sleep(SAMPLE_S)
            now = rss_mb()
            with self._lock:
                for frame in self._open:
                    frame.peak_mb = max(frame.peak_mb, now)

    def to_json(self) -> list[dict[str, str | float]]:
        return [s.to_json() for s in self.finished]


STEPS = StepPeaks()  # the one record of this process's steps


# ------------------------------------------------------------------------------------------- the estimate

GB = 2**30
BASE_GB = 1.2  # the interpreter with torch, transformers, onnx and ONNX Runtime imported (measured: 1.0-1.2 GB)
# Each step's need in weights (W, the model's fp32 parameters and buffers) and activations (A, the peak of live
# tensors in one PyTorch forward at the export batch, `measure.activations`), fitted to the steps' measured peaks
# (report.json's memory.steps; scripts/recipe_memory.py) of SwinV2-L at 544 px (W 0.73 GB, A 1.49 GB: export 6.0,
# check 8.9, timing 9.5 GB) and SAM ViT-H at 240 px (W 2.4 GB: export 12.6 GB) on a 2-core, 24 GB machine:
EXPORT_W, EXPORT_A = 5.0, 1.0  # the models (W) + torch.onnx's exported program and protobuf (~4 W) + one trace
PASSES_W = 3.5  # the models + the graph and graph-surgeon's copy of it
# Weights from core.contract.EXTERNAL_DATA_BYTES on stay on disk: the exporter writes them tensor by
# tensor, the passes and the fusion copy them file to file. SAM ViT-H at 240 px (W 2.4 GB): export 3.4, passes
# 3.4 GB, where the in-memory road held 12.6 and 10.5 GB. What remains is the PyTorch models themselves.
ON_DISK_EXPORT_W, ON_DISK_PASSES_W = 1.0, 1.2
# An ONNX Runtime session holds its graph (~1.3 W); running the models and engines needs ~4.3 A on top: PyTorch's
# and ORT's activations and the heap they leave behind (glibc keeps freed pages in pieces it cannot hand back).
SESSION_W, RUN_A = 1.3, 4.3
ARENA_A = 1.6  # what a session under LEAN_GRAPH_BYTES keeps in its arena between runs
# The command's own process while a step runs in a fresh one (core.process): the interpreter and libraries with no
# model, measured 0.80-0.89 GB waiting in `run` for SwinV2-L, SAM ViT-H and SWAG ViT-H/14.
WAITING_GB = 0.9


@dataclass(frozen=True)
class Need:
    """What one model needs, in bytes: its weights and one forward's activations (baseline or patched: the larger)."""

    weights: int
    activations: int

    def to_json(self) -> dict[str, float]:
        return {"weights_gb": round(self.weights / GB, 3), "activations_gb": round(self.activations / GB, 3)}

    @classmethod
    def from_json(cls, data: dict) -> Need:
        return cls(int(data["weights_gb"] * GB), int(data["activations_gb"] * GB))


def estimate_steps(need: Need, steps: tuple[str, ...], sessions: int = 2, torch_models: bool = True,
                   lean: bool = False, apart: bool = False) -> dict[str, float]:
    """GB each of a command's `steps` is expected to peak at: "export", "passes", "check", "latency".

    sessions: ONNX Runtime sessions timed side by side; torch_models: the PyTorch models stay loaded while the
    engines are timed; lean: the graphs are over LEAN_GRAPH_BYTES (no arena between runs); apart: export, passes
    and check run each in a fresh process while the command's own waits (WAITING_GB on top of each)."""
    from hgdeploy.core.contract import EXTERNAL_DATA_BYTES

    w, a = need.weights / GB, need.activations / GB
    on_disk = need.weights >= EXTERNAL_DATA_BYTES
    models = w if torch_models else 0.0
    held = SESSION_W * w + (0.0 if lean else ARENA_A * a)
    table = {"export": BASE_GB + (ON_DISK_EXPORT_W if on_disk else EXPORT_W) * w + EXPORT_A * a,
             "passes": BASE_GB + (ON_DISK_PASSES_W if on_disk else PASSES_W) * w,
             "check": BASE_GB + w + SESSION_W * w + RUN_A * a,  # parity needs the PyTorch models
             "latency": BASE_GB + models + (sessions - 1) * held + SESSION_W * w + RUN_A * a}
    if apart:
        table = {step: gb + (WAITING_GB if step != "latency" else 0.0) for step, gb in table.items()}
    return {step: round(table[step], 2) for step in steps}


def estimate_memory(need: Need, what: str, size: tuple[int, int], steps: tuple[str, ...], sessions: int,
                    torch_models: bool, lean: bool, apart: bool = False) -> dict:
    """The estimate of `what` (a command on a model at `size`); refused (UserError, one line: the need, the memory
    it may use, a smaller setting) when it exceeds that memory. Returns report.json's memory section before the
    measured peaks are added, with the line a command says on stderr (`said`)."""
    from hgdeploy.core.errors import UserError

    estimate = estimate_steps(need, steps, sessions, torch_models, lean, apart)
    worst = max(estimate, key=estimate.get)
    have, source = machine_memory_gb()
    said = f"memory: {what} needs about {estimate[worst]:.1f} GB at its peak ({worst}); {source}: {have:.1f} GB"
    if estimate[worst] > have:
        smaller = smaller_setting(need, steps, sessions, torch_models, lean, size, have, apart)
        raise UserError(f"{what} at {size[0]}x{size[1]} needs about {estimate[worst]:.1f} GB of memory and {source} "
                        f"is {have:.1f} GB; {smaller} (or set ${MEMORY_ENV} to plan with more)")
    return {"estimate_gb": estimate[worst], "estimate_steps": estimate, "memory_gb": round(have, 1),
            "memory_source": source, **need.to_json(), "said": said}


def smaller_setting(need: Need, steps: tuple[str, ...], sessions: int, torch_models: bool, lean: bool,
                    size: tuple[int, int], have: float, apart: bool = False) -> str:
    """What would fit: the largest smaller input (multiples of 32, the same aspect) whose activations, taken as
    growing with the pixels, fit; or, when the weights alone do not, a bigger machine. With global attention the
    activations grow faster than the pixels, so the smaller input needs less than this says, never more."""
    def fits(h: int, w: int) -> bool:
        scaled = Need(need.weights, int(need.activations * h * w / (size[0] * size[1])))
        return max(estimate_steps(scaled, steps, sessions, torch_models, lean, apart).values()) <= have

    fixed = max(estimate_steps(Need(need.weights, 0), steps, sessions, torch_models, lean, apart).values())
    shrink = [(int(size[0] * f) // 32 * 32, int(size[1] * f) // 32 * 32) for f in (x / 64 for x in range(63, 0, -1))]
    smaller = next(((h, w) for h, w in shrink if h >= 32 and w >= 32 and fits(h, w)), None)
    if fixed >= have or smaller is None:
        return f"the weights alone need about {fixed:.1f} GB: run it on a machine with more memory"
    h, w = smaller
    return f"an input of about {h}x{w} would fit (--set model.input_size={h}x{w})"
