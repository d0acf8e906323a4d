"""Engine profiles, the ONNX Runtime runner, interleaved latency and atomic outputs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hgdeploy.backends import load_profile, make_runner
from hgdeploy.backends.profile import BUNDLED_PROFILES
from hgdeploy.backends.pyt import torch_runner
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.files import staged_output
from hgdeploy.families.catalogue import families
from hgdeploy.measure.timing import time_interleaved
from hgdeploy.patch.export import export_onnx


def test_bundled_profile_loads():
    profile = load_profile(None)
    assert profile.name == "ort-cpu" and profile.backend == "onnxruntime" and profile.cosine_min >= 0.9999


@pytest.mark.parametrize("name", sorted({p.stem for folder in BUNDLED_PROFILES for p in Path(folder).glob("*.toml")}))
def test_every_bundled_profile_takes_every_family(name):
    """A bundled profile names no output one family lacks: the fp16 profiles' bounds for the default model's
    tokens and heatmap once refused every other family (hgdeploy export segmenter --engine ort-cuda-fp16)."""
    profile = load_profile(name)
    refused = {f.name: profile.unknown_outputs(f.output_names) for f in families()}
    assert not any(refused.values()), refused


@pytest.mark.parametrize("text,needle", [
    ('[engine]\nbackend = "onnxruntime"\nprovders = ["cpu"]\n', "did you mean engine.providers"),
    ('[engine]\nbackend = "tensorflow"\n', "unknown engine.backend"),
    ('[engine]\nproviders = ["cpu"]\n', "missing required key engine.backend"),
    ('[engine]\nbackend = "onnxruntime"\n[bench]\nruns = "ten"\n', "bench.runs"),
    ('[engine\n', "cannot read engine profile"),
    ('[engine]\nbackend = "onnxruntime"\n[parity.max_abs_per_kind]\nheatmaps = 0.1\n', "not an output kind"),
    ('[engine]\nbackend = "onnxruntime"\n[parity.max_abs_per_kind]\nheatmap = "0.1"\n', "must be a number"),
    ('[engine]\nbackend = "onnxruntime"\n[parity]\nmax_abs_rel = -1\n', "must be >= 0"),
])
def test_bad_profiles_are_named(tmp_path, text, needle):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        load_profile(str(path))


def test_an_outputs_bound_is_its_names_then_its_kinds_then_max_abs(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[engine]\nbackend = "onnxruntime"\n[parity]\nmax_abs = 0.01\n'
                    '[parity.max_abs_per_kind]\nheatmap = 0.3\nsegmentation = 0.2\n'
                    '[parity.max_abs_per_output]\nlogits = 0.05\n')
    bounds = load_profile(str(path)).max_abs_bounds((("heatmap", "heatmap"), ("tokens", "tokens"),
                                                     ("logits", "segmentation")))
    assert bounds == {"heatmap": 0.3, "logits": 0.05}  # tokens: no bound of its own, max_abs applies


class _Sleep(torch.nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return (x + 1,)


def test_interleaved_bench_ranks_runners_by_their_cost():
    x = torch.zeros(1, 4)
    runners = {name: torch_runner(_Sleep(s), x, ("y",), INPUT_NAME, name) for name, s in (("slow", 0.012), ("fast", 0.004))}
    timings = time_interleaved(runners, {INPUT_NAME: x.numpy()}, warmup=1, runs=7)
    assert timings["slow"].runs == 7 and timings["fast"].runs == 7
    assert 2.0 < timings["slow"].median_ms / timings["fast"].median_ms < 4.0
    assert timings["fast"].p90_ms >= timings["fast"].median_ms >= timings["fast"].min_ms


def test_ort_runner_and_missing_provider(tmp_path):
    lin = torch.nn.Linear(4, 3).eval()

    class Wrap(torch.nn.Module):
        def forward(self, x):
            return (lin(x),)

    x = torch.randn(1, 4)
    path = export_onnx(Wrap(), x, tmp_path / "m.onnx", ("y",))
    with make_runner(path, load_profile(None)) as runner:
        out = runner.infer({INPUT_NAME: x.numpy()})["y"]
    torch.testing.assert_close(torch.from_numpy(out), lin(x).detach(), rtol=1e-5, atol=1e-5)
    bad = tmp_path / "nosuch.toml"  # a provider no onnxruntime build has: the same answer on CPU and GPU machines
    bad.write_text('[engine]\nbackend = "onnxruntime"\nproviders = ["nosuchprovider"]\n')
    with pytest.raises(UserError, match="nosuchprovider"):
        make_runner(path, load_profile(str(bad)))


def test_staged_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "report.json").write_text("{}")
            raise RuntimeError("export failed half-way")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_output(out) as stage:
        (stage / "report.json").write_text("{}")
    assert (out / "report.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("engine, reference, on_device, timed", [
    ("ort-cpu", ("cpu", torch.float32, False), ("cpu", torch.float32, False), ("cpu", torch.float32, False)),
    ("ort-cuda", ("cpu", torch.float32, False), ("cuda", torch.float32, False), ("cuda", torch.float32, True)),
    ("ort-cuda-fp16", ("cpu", torch.float32, False), ("cuda", torch.float32, False), ("cuda", torch.float16, True)),
])
def test_pytorch_runs_where_each_use_needs_it(engine, reference, on_device, timed):
    """The fp32 reference of parity (run, check) and eval moves to a GPU profile's GPU (a dataset of ViT-L windows
    takes hours on a CPU, Segmenter's parity 79 s); timing follows the profile's device, precision and CUDA graph.
    The runners are only built here (a GPU one allocates nothing until activated)."""
    from conftest import TINY_TIMM

    from hgdeploy.core.recipe import load_recipe
    from hgdeploy.pipeline.context import load_context
    from hgdeploy.pipeline.steps import torch_runners

    ctx = load_context(load_recipe(TINY_TIMM[0], [a for a in TINY_TIMM[1:] if a != "--set"]), load_profile(engine))

    def where(**kwargs):
        runners = torch_runners(ctx, **kwargs)
        seen = {(r._device.type, r._dtype, r._cuda_graph) for r in runners.values()}
        assert len(seen) == 1
        return seen.pop()

    assert where() == reference
    assert where(reference_on_device=True) == on_device
    assert where(on_profile=True) == timed


def test_a_gpu_profile_on_a_machine_without_a_gpu_names_the_missing_gpu_first():
    """Without a GPU, advice to reinstall onnxruntime as onnxruntime-gpu (a large install) helps nothing."""
    from hgdeploy.backends import load_profile
    from hgdeploy.backends import machine, onnxrt

    if machine.cuda_gpu_name() is not None:
        pytest.skip("a CUDA GPU is visible: this checks the machine without one")
    for name in ("ort-cuda", "ort-cuda-fp16"):
        reason = onnxrt.available(load_profile(name))
        assert reason == machine.NO_GPU, reason
