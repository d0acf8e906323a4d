"""cluster.tau = "auto": the temperature is found from the tokens themselves, follows their scale, and an
export's calibrated value is the one later commands use."""

from __future__ import annotations

import json
import math

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


def test_auto_tau_follows_features_far_from_unit_scale():
    """tau ~ squared feature scale over 16 orders of magnitude: the bisection's bracket comes from the tokens'
    own distances (a fixed bracket around 1 would cap tau at its ends)."""
    layer = TokenClustering((12, 12), (6, 6), 3, 3, 1.0, "local")
    tau = calibrate_tau(layer, _tokens())
    for scale in (1e-4, 1e4):
        assert calibrate_tau(layer, _tokens(scale)) == pytest.approx(scale**2 * tau, rel=0.01)


def test_auto_tau_reads_its_scale_from_the_tokens_that_are_not_on_a_centre():
    """Tokens that sit exactly on their initial centre (a flat cell) have distance 0 and no scale: the scale is the
    median over the others."""
    torch.manual_seed(1)
    z = torch.randn(1, 4, 4, 8)
    for rows, cols in ((slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
        z[:, rows, cols] = torch.randn(1, 1, 1, 8)  # three flat cells: 12 of 16 tokens exactly on their cell's mean
    z = z.reshape(1, 16, 8)
    layer = TokenClustering((4, 4), (2, 2), 3, 1, 1.0, "dense")
    tau = calibrate_tau(layer, z)
    assert layer_sharpness(TokenClustering((4, 4), (2, 2), 3, 1, tau, "dense"), z) == pytest.approx(
        TAU_SHARPNESS, abs=0.01)


@pytest.mark.parametrize("form", ["dense", "local"])
def test_auto_tau_when_every_token_is_exactly_on_its_centre(form):
    """One token a cell with small-integer features: every token's distance to its own centre is exactly 0 in
    float32, so the tokens give no scale from their nearest centres; tau still brings the layer's first soft
    assignment (over the neighbouring cells) to the target sharpness."""
    torch.manual_seed(2)
    z = torch.randint(-3, 4, (1, 16, 8)).float()
    layer = TokenClustering((4, 4), (4, 4), 3, 1, 1.0, form)
    assert (layer.initial_distances(z).amin(-1) == 0).all()
    tau = calibrate_tau(layer, z)
    assert layer_sharpness(TokenClustering((4, 4), (4, 4), 3, 1, tau, form), z) == pytest.approx(TAU_SHARPNESS,
                                                                                                 abs=0.01)


def test_auto_tau_on_tokens_that_carry_nothing_comes_from_the_fallback_scale():
    """All-zero tokens (a blank calibration batch): every distance is 0 and so is the tokens' squared norm, so no
    token is off its centre and the scale falls back to 1: tau is a finite positive number, not the math domain
    error of log(0) that a median over the on-centre tokens gives."""
    layer = TokenClustering((4, 4), (2, 2), 3, 1, 1.0, "dense")
    tau = calibrate_tau(layer, torch.zeros(1, 16, 8))
    assert math.isfinite(tau) and tau > 0


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
