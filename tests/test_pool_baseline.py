"""cluster.method = "pool_bilinear": the paper's parameter-free baseline at the same alpha, grid and
reconstruction layer, exportable and comparable with clustering at equal cost."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TIMM, hgdeploy_main

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import PlanRequest
from hgdeploy.layers import BilinearUpsampling, TokenPooling

hgdeploy = hgdeploy_main


def test_pooling_then_upsampling_is_the_identity_on_the_token_grid_and_keeps_constants():
    z = torch.randn(2, 36, 8)
    assert torch.allclose(BilinearUpsampling((6, 6), (6, 6))(TokenPooling((6, 6), (6, 6))(z)), z, atol=1e-6)
    up = BilinearUpsampling((7, 9), (3, 4))
    assert torch.allclose(up(torch.ones(1, 12, 5)), torch.ones(1, 63, 5), atol=1e-6)  # weights sum to 1
    ramp = torch.arange(4.0).repeat(3).view(1, 12, 1)  # 0 1 2 3 along each cluster row
    rows = up(ramp).view(7, 9)
    assert torch.all(rows[:, 1:] >= rows[:, :-1] - 1e-6)  # bilinear: monotone between cluster centres


def test_an_unknown_method_is_refused():
    with pytest.raises(UserError, match="cluster.method='mean' must be one of cluster, pool_bilinear"):
        PlanRequest.from_section({"alpha": 1, "grid": "3x3", "method": "mean"})


def test_the_baseline_costs_about_what_clustering_costs_and_runs_end_to_end(tmp_path):
    cluster = json.loads(hgdeploy("flops", *TINY_TIMM, "--json").stdout)
    result = hgdeploy("run", *TINY_TIMM, "--set", "cluster.method=pool_bilinear", "--out", str(tmp_path / "pool"),
                      "--json")
    assert result.returncode == 0, result.stderr
    pool = json.loads(result.stdout)
    assert pool["plan"]["method"] == "pool_bilinear" and pool["parity"]["passed"]
    assert pool["gflops"]["patched"] < pool["gflops"]["baseline"]
    assert pool["gflops"]["clustering"] < cluster["gflops"]["clustering"]  # no k-means iterations, no top-k
    assert abs(pool["gflops"]["patched"] - cluster["gflops"]["patched"]) < 0.1 * cluster["gflops"]["patched"]
