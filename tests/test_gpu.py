"""Every GPU engine profile end to end where the machine has the GPU and the libraries it needs.

On a machine without them each test skips with the reason the profile gives (the same one-line
reason `hgdeploy` prints); CI never has a GPU, so these run on the GPU machines of the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL_EXPORT, hgdeploy_cli

from hgdeploy.backends import availability, load_profile

REPO = Path(__file__).resolve().parents[1]
GPU_PROFILES = sorted(p.stem for p in (REPO / "engines").glob("*.toml") if load_profile(p.stem).on_gpu)
SMALL = [a for s in SMALL_EXPORT for a in ("--set", s)]


hgdeploy = hgdeploy_cli


def require(profile: str) -> None:
    reason = availability(load_profile(profile))
    if reason is not None:
        pytest.skip(f"{profile}: {reason}")


def test_every_bundled_gpu_profile_is_covered():
    assert {"ort-cuda", "ort-cuda-fp16", "ort-trt", "trt-fp32", "trt-fp16"} <= set(GPU_PROFILES)


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_export_run_and_bench_on_the_gpu(profile, tmp_path):
    require(profile)
    out = tmp_path / "out"
    ran = hgdeploy("run", *SMALL, "--engine", profile, "--out", str(out), "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout)
    assert report["parity"]["passed"], report["parity"]
    assert report["plan"]["device"] == "gpu" and report["plan"]["clustering_form"] == "dense"
    assert report["parity"]["reference_device"] == "gpu"  # the fp32 reference on the profile's device, not the CPU
    engine = load_profile(profile)
    if engine.precision == "fp16":
        twin = "fused.fp16" if engine.fused_attention else "fp16"
        assert report["parity"]["engine_model"] == f"patched.{twin}.onnx" and (out / f"baseline.{twin}.onnx").is_file()
    assert report["backend"]["versions"]["gpu"] not in ("None", None)
    benched = hgdeploy("bench", *SMALL, "--engine", profile, "--out", str(out), "--torch", "--json")
    assert benched.returncode == 0, benched.stderr[-3000:]
    timings = json.loads(benched.stdout)["latency"]
    assert {"baseline", "patched", "torch_baseline", "torch_patched"} <= set(timings)
    assert all(t["median_ms"] > 0 for t in timings.values())
