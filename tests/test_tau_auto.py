"""cluster.tau = "auto": the temperature is found from the tokens themselves, follows their scale, and an
export's calibrated value is the one later commands use."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TIMM, hgdeploy_main, layer_sharpness

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import PlanRequest
from hgdeploy.layers import TAU_SHARPNESS, TokenClustering, calibrate_tau

hgdeploy = hgdeploy_main


def _tokens(scale: float = 1.0) -> torch.Tensor:
    torch.manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(2, 16, 12, 12), 3, 1, 1)  # neighbouring tokens alike
    return scale * smooth.flatten(2).transpose(1, 2)  # [2, 144, 16]


@pytest.mark.parametrize("form", ["dense", "local"])
def test_auto_tau_reaches_the_target_sharpness_and_scales_with_the_features(form):
    """The sharpness is the layer's own: a layer built with the calibrated tau gives its first soft assignment (its
    softmax as it runs, not tau.sharpness on the distances calibrate_tau itself used) mean largest weight 0.6."""
    z = _tokens()
    tau = calibrate_tau(TokenClustering((12, 12), (6, 6), 3, 3, 1.0, form), z)

    def at(t: float) -> float:
        return layer_sharpness(TokenClustering((12, 12), (6, 6), 3, 3, t, form), z)

    assert at(tau) == pytest.approx(TAU_SHARPNESS, abs=0.01)
    assert at(tau / 10) > 0.9 > 0.3 > at(tau * 10)
    layer = TokenClustering((12, 12), (6, 6), 3, 3, 1.0, form)
    assert calibrate_tau(layer, _tokens(10.0)) == pytest.approx(100 * tau, rel=0.01)  # tau ~ squared feature scale


def test_dense_and_local_forms_calibrate_alike():
    z = _tokens()
    dense, local = (TokenClustering((12, 12), (6, 6), 3, 3, 1.0, f) for f in ("dense", "local"))
    assert calibrate_tau(dense, z) == pytest.approx(calibrate_tau(local, z), rel=0.01)


def test_tau_is_a_number_or_auto():
    assert PlanRequest.from_section({"alpha": 1, "grid": "3x3", "tau": "auto"}).tau_auto
    with pytest.raises(UserError, match="must be a number or \"auto\""):
        PlanRequest.from_section({"alpha": 1, "grid": "3x3", "tau": "sharp"})


def test_an_export_records_the_calibrated_tau_and_check_reuses_it(tmp_path, two_photos):
    args = [*TINY_TIMM, "--set", "cluster.tau=auto"]
    out = tmp_path / "export"
    exported = hgdeploy("export", *args, "--out", str(out), "--json")
    assert exported.returncode == 0, exported.stderr
    plan = json.loads(exported.stdout)["plan"]
    assert plan["tau_auto"]["images"] == 8 and plan["tau"] == plan["tau_auto"]["tau"] > 0  # the bundled photos
    checked = hgdeploy("check", *args, "--out", str(out), "--images", str(two_photos), "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["plan"]["tau"] == plan["tau"]  # not calibrated again on the other photos
    assert report["plan"]["tau_auto"]["source"] == "recorded by the export"
    assert report["parity"]["passed"]
