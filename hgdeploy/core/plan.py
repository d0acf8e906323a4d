"""The clustering plan: every value the two layers need, fixed and validated before patching.

One road from a recipe to a plan: the recipe's [cluster] section is parsed once into a
`PlanRequest`; a family states the facts of a loaded model once (`ModelFacts`); `make_plan` joins
the two into a validated `ClusterPlan`. Every plan rule lives in this module. A plan is plain data
so that the patched forward pass never has to decide anything at run time (that is what keeps the
export static).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from hgdeploy.core.errors import UserError
from hgdeploy.core.files import JsonObject
from hgdeploy.core.preprocess import Preprocess

RECONSTRUCTIONS = ("softmax", "official")
FORMS = ("auto", "dense", "local")
DEVICES = ("cpu", "gpu")
RECONSTRUCT_ON = ("features", "logits")
RECONSTRUCT_FROM = ("nearest", "neighbourhood")
# "cluster": the method; "pool_bilinear": the paper's parameter-free baseline at the same alpha, grid and
# reconstruction layer (average pooling to the grid, bilinear upsampling back), to compare at equal cost.
METHODS = ("cluster", "pool_bilinear")
# [cluster] keys passed to ClusterPlan as they are (alpha, grid and reconstruct_after are resolved).
TAU_AUTO = "auto"
OPTION_KEYS = ("neighbours", "iters", "tau", "k", "reconstruction", "form", "reconstruct_on", "reconstruct_from",
               "method")


def parse_grid(value: Any, what: str = "grid") -> tuple[int, int]:
    """Parse "24x24" (or [24, 24], or 24) into (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        if m:
            return (int(m.group(1)), int(m.group(2)))
        if value.strip().isdigit():
            return (int(value), int(value))
    raise UserError(f"{what} must look like '24x24', got {value!r}")


@dataclass(frozen=True)
class ClusterPlan:
    """Where and how tokens are clustered.

    token_grid: (H, W) patch-token grid of the input; grid: (h, w) cluster grid.
    alpha: layers run on all N tokens before clustering.
    reconstruct_after: number of layers run when tokens are reconstructed (alpha < it <= depth).
    neighbours: side of the square neighbourhood of cluster cells (lambda), odd.
    iters: soft k-means iterations (kappa). tau: temperature, logits are -d^2 / tau.
    method: "cluster", or "pool_bilinear" (the paper's baseline: average pooling in, bilinear upsampling out;
    neighbours, iters, tau, k and the reconstruction options then do not apply).
    k: nearest clustering-time centres each token is rebuilt from (reconstruct_from "nearest").
    reconstruct_from: "nearest" (the k nearest of all centres, a TopK; official) or "neighbourhood"
    (the neighbours x neighbours cells around the token's own cell, as in clustering).
    reconstruction: "softmax" (log-space, cannot underflow) or "official" (the authors' code exactly: exp, every
    weight >= the k-th, L2-norm; and in the clustering their M-step and token-to-cell map, `official`).
    form: clustering layout, "dense" (official [N, M] matrix), "local" (gathers) or "auto" (fewer MACs).
    reconstruct_on: "features" rebuilds the N tokens after `reconstruct_after` layers; "logits" lets the
    head run on the clusters and rebuilds its per-token logits (Segmenter's official choice).
    device: where the patched model will run ("cpu" or "gpu", the engine profile's); "auto" forms
    are chosen for it.
    """

    token_grid: tuple[int, int]
    grid: tuple[int, int]
    alpha: int
    reconstruct_after: int
    depth: int
    neighbours: int = 5
    iters: int = 5
    tau: float = 50.0
    k: int = 20
    reconstruction: str = "softmax"
    form: str = "auto"
    reconstruct_on: str = "features"
    reconstruct_from: str = "nearest"
    method: str = "cluster"
    device: str = "cpu"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def num_clusters(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def official(self) -> bool:
        """reconstruction "official": the layers follow the authors' code (their reconstruction weights, ties at
        the k-th weight, the clustering's M-step and token-to-cell map), not only the reconstruction formula."""
        return self.reconstruction == "official"

    @property
    def is_identity_grid(self) -> bool:
        return self.grid == self.token_grid

    def to_dict(self) -> JsonObject:
        d = asdict(self)
        d["token_grid"] = f"{self.token_grid[0]}x{self.token_grid[1]}"
        d["grid"] = f"{self.grid[0]}x{self.grid[1]}"
        d["num_tokens"] = self.num_tokens
        d["num_clusters"] = self.num_clusters
        return d


def validate(p: ClusterPlan) -> None:
    """Raise UserError naming the first impossible value."""
    H, W = p.token_grid
    h, w = p.grid
    if h < 1 or w < 1:
        raise UserError(f"cluster.grid {h}x{w} must be positive")
    if h > H or w > W:
        raise UserError(
            f"cluster.grid {h}x{w} is larger than the token grid {H}x{W}; choose at most {H}x{W} "
            f"(N/4..N/2 clusters is the useful range)"
        )
    if not 1 <= p.alpha < p.depth:
        raise UserError(f"cluster.alpha={p.alpha} is out of range: the model has {p.depth} layers, use 1..{p.depth - 1}")
    if not p.alpha < p.reconstruct_after <= p.depth:
        raise UserError(
            f"cluster.reconstruct_after={p.reconstruct_after} must be in {p.alpha + 1}..{p.depth} "
            f"(after alpha={p.alpha}, at most the model's {p.depth} layers)"
        )
    check_options(p.neighbours, p.iters, p.tau, p.k, p.form, p.reconstruct_on, p.reconstruction, p.reconstruct_from,
                  p.method)
    if p.k > h * w:
        raise UserError(f"cluster.k={p.k} must be in 1..{h * w} (the number of clusters {h}x{w})")
    if p.device not in DEVICES:
        raise UserError(f"plan device {p.device!r} must be one of {', '.join(DEVICES)} (engine.device)")
    if p.reconstruct_on == "logits" and p.reconstruct_after != p.depth:
        raise UserError(f"cluster.reconstruct_on='logits' runs the head on the clusters: cluster.reconstruct_after "
                        f"must be the model's depth {p.depth}, got {p.reconstruct_after}")


def check_options(neighbours: int, iters: int, tau: float, k: int, form: str, reconstruct_on: str,
                  reconstruction: str, reconstruct_from: str, method: str = "cluster") -> None:
    """The rules that hold whatever the model: checked when a recipe is read, before any model is loaded."""
    if neighbours < 1 or neighbours % 2 == 0:
        raise UserError(f"cluster.neighbours={neighbours} must be a positive odd number (e.g. 5 for 5x5)")
    if iters < 1:
        raise UserError(f"cluster.iters={iters} must be at least 1")
    if not tau > 0:
        raise UserError(f"cluster.tau={tau} must be > 0")
    if k < 1:
        raise UserError(f"cluster.k={k} must be at least 1")
    if form not in FORMS:
        raise UserError(f"cluster.form={form!r} must be one of {', '.join(FORMS)}")
    if reconstruct_on not in RECONSTRUCT_ON:
        raise UserError(f"cluster.reconstruct_on={reconstruct_on!r} must be one of {', '.join(RECONSTRUCT_ON)}")
    if reconstruction not in RECONSTRUCTIONS:
        raise UserError(f"cluster.reconstruction={reconstruction!r} must be one of {', '.join(RECONSTRUCTIONS)}")
    if reconstruct_from not in RECONSTRUCT_FROM:
        raise UserError(f"cluster.reconstruct_from={reconstruct_from!r} must be one of {', '.join(RECONSTRUCT_FROM)}")
    if method not in METHODS:
        raise UserError(f"cluster.method={method!r} must be one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class PlanRequest:
    """What a recipe's [cluster] section asks for, parsed once; a plan only once the model is known.

    reconstruct_after None: the family decides (the first layer a head reads after alpha).
    """

    alpha: int
    grid: tuple[int, int]
    reconstruct_after: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tau_auto(self) -> bool:
        """tau = "auto": calibrated on the model's own features at layer alpha (layers.calibrate_tau)."""
        return self.options.get("tau") == TAU_AUTO

    def with_tau(self, tau: float) -> "PlanRequest":
        return replace(self, options={**self.options, "tau": float(tau)})

    @classmethod
    def from_section(cls, cluster: Mapping[str, Any]) -> "PlanRequest":
        options = {k: cluster[k] for k in OPTION_KEYS if k in cluster}
        if isinstance(options.get("tau"), str) and options["tau"] != TAU_AUTO:
            raise UserError(f"cluster.tau = {options['tau']!r} must be a number or \"{TAU_AUTO}\"")
        if "tau" in options and options["tau"] != TAU_AUTO:
            options["tau"] = float(options["tau"])
        defaults = {f.name: f.default for f in fields(ClusterPlan) if f.name in OPTION_KEYS}
        check_options(**(defaults | options | ({"tau": 1.0} if options.get("tau") == TAU_AUTO else {})))
        return cls(alpha=cluster["alpha"], grid=parse_grid(cluster["grid"], "cluster.grid"),
                   reconstruct_after=cluster.get("reconstruct_after"), options=options)


@dataclass(frozen=True)
class ModelFacts:
    """What a loaded model is, as far as a plan is concerned; each family states it once.

    head_reads: layer counts (c = the output after c blocks) whose outputs a head or neck consumes;
    a plan must not cluster across them; empty: only the last layer's. preprocess: how photos are
    prepared for these weights (the recipe's [preprocess] may override it).
    """

    token_grid: tuple[int, int]
    depth: int
    preprocess: Preprocess
    head_reads: tuple[int, ...] = ()

    @property
    def reads(self) -> tuple[int, ...]:
        """The layers a head reads; by default only the last layer's output."""
        return self.head_reads or (self.depth,)


def default_reconstruct_after(reads: tuple[int, ...], alpha: int, depth: int) -> int:
    """The first layer count after alpha whose output a head reads: clusters cannot reach a head."""
    later = [r for r in sorted(reads) if r > alpha]
    return later[0] if later else depth


def check_reads(plan: ClusterPlan, reads: tuple[int, ...], family: str) -> None:
    """A head reading a layer between clustering and reconstruction would get cluster tokens."""
    inside = [r for r in sorted(reads) if plan.alpha < r < plan.reconstruct_after]
    if inside:
        raise UserError(
            f"{family}: the head reads the output of layer {inside[0]} (1-based), which lies between clustering "
            f"(after layer {plan.alpha}) and reconstruction (after layer {plan.reconstruct_after}); set "
            f"cluster.reconstruct_after to at most {inside[0]} or move cluster.alpha to {inside[0]} or later")


def make_plan(request: PlanRequest, facts: ModelFacts, family: str,
              placements: tuple[str, ...] = ("features",), device: str = "cpu") -> ClusterPlan:
    """The validated plan for one model: the request's values, the family's defaults and rules.

    placements: the `reconstruct_on` values the family supports; device: where the engine runs.
    """
    after = request.reconstruct_after
    if after is None:
        after = default_reconstruct_after(facts.reads, request.alpha, facts.depth)
    plan = ClusterPlan(token_grid=facts.token_grid, grid=request.grid, alpha=request.alpha, reconstruct_after=after,
                       depth=facts.depth, device=device, **request.options)
    if plan.reconstruct_on not in placements:
        raise UserError(f"cluster.reconstruct_on={plan.reconstruct_on!r} is not supported by family {family} "
                        f"(supported: {', '.join(placements)})")
    check_reads(plan, facts.reads, family)
    return plan
