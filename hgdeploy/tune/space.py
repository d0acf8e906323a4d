"""What `hgdeploy tune` sweeps and what it must keep: the search space and the quality budget.

Plain data and rules, no model: the default space follows the model's facts (depth, token grid) and the
recipe's own plan; a `--space FILE` (TOML, [space] table) replaces any of its axes. Plans are listed in the
order that lets the sweep prune: for one alpha and one set of options, grids from the most clusters to the
fewest, so that the first grid to miss the budget rules out the smaller ones without running them.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import (
    FORMS,
    RECONSTRUCT_FROM,
    TAU_AUTO,
    ModelFacts,
    PlanRequest,
    parse_grid,
)

BASELINES = ("pool_bilinear", "downscale")
# Metrics where lower is better (checks.LOWER_IS_BETTER names them by suffix).
LOWER_SUFFIXES = ("_mae", "_error", "_max")
# Default axes, as fractions: alpha across the middle of the network (early alpha loses fidelity fast),
# cluster-grid sides across the useful range N/4..N/2 clusters and a little above it.
ALPHA_FRACTIONS = (0.33, 0.42, 0.5, 0.58, 0.67)
GRID_FRACTIONS = (0.55, 0.65, 0.75, 0.85)
DEFAULT_ITERS = (3, 5)
DEFAULT_TIMED = 6


DEFAULT_CONFIDENCE = 0.9
# The budget the README's examples tune to, and what `run`, `check` and `bench` hold fidelity against without
# --budget.
DEFAULT_BUDGET = "cosine>=0.985"


@dataclass(frozen=True)
class Budget:
    """"cosine>=0.985": the fidelity summary key it reads, the bound and its direction.

    A mean over a handful of images overfits them: the plan that just met cosine >= 0.985 in the mean of six
    photos gave 0.9815 on three others. So a budget on a mean is met when the one-sided `confidence` bound
    of that mean (Student's t over the per-image values) meets it; a budget on the worst image (`_min`,
    `_max`) is already a bound and is read as it is. confidence 0.5 is the plain mean.
    """

    metric: str
    op: str
    value: float
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def key(self) -> str:
        """The key in a fidelity summary (checks.fidelity names the mean cosine "cosine_mean")."""
        return "cosine_mean" if self.metric == "cosine" else self.metric

    @property
    def per_image_key(self) -> str | None:
        """The per-image metric whose mean the budget bounds (None for a worst-image budget)."""
        if self.metric.endswith(("_min", "_max")):
            return None
        return self.metric

    def bound(self, fidelity: dict[str, Any]) -> float | None:
        """The confidence bound of the metric's mean over the images (the mean itself with one image)."""
        mean = fidelity.get(self.key)
        key = self.per_image_key
        values = [r[key] for r in fidelity.get("per_image", []) if key and r.get(key) is not None]
        if mean is None or len(values) < 2 or self.confidence <= 0.5:
            return mean
        from scipy.stats import t

        spread = t.ppf(self.confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        return mean - spread if self.op == ">=" else mean + spread

    def met(self, fidelity: dict[str, Any]) -> bool:
        v = self.bound(fidelity)
        if v is None:
            return False
        return v >= self.value if self.op == ">=" else v <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_budget(text: str, confidence: float = DEFAULT_CONFIDENCE) -> Budget:
    """"cosine>=0.985", "heatmap_iou>=0.9", "depth_rel_error<=0.05"; the direction must fit the metric."""
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text or "")
    if not m:
        hint = (" (quote it: an unquoted > is the shell's redirection, which left only the metric name)"
                if re.fullmatch(r"\s*[A-Za-z_]\w*\s*", text or "") else "")
        raise UserError(f"--budget {text!r} must look like METRIC>=VALUE, e.g. --budget 'cosine>=0.985'{hint}")
    metric, op, raw = m.groups()
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"--budget {text!r}: {raw!r} is not a number") from None
    lower = metric.endswith(LOWER_SUFFIXES)
    if lower and op != "<=":
        raise UserError(f"--budget {text!r}: lower {metric} is better, so the budget is an upper bound: "
                        f"{metric}<={value:g}")
    if not lower and op != ">=":
        raise UserError(f"--budget {text!r}: higher {metric} is better, so the budget is a lower bound: "
                        f"{metric}>={value:g}")
    if not 0.5 <= confidence < 1:
        raise UserError(f"--confidence {confidence} must be at least 0.5 (the plain mean) and below 1")
    return Budget(metric, op, value, confidence)


def check_budget_metric(budget: Budget, available: list[str]) -> None:
    """The metric must be one this model's outputs have (the keys of its fidelity summary)."""
    if budget.key not in available:
        names = sorted({"cosine" if k == "cosine_mean" else k for k in available})
        raise UserError(f"--budget {budget}: this model has no metric {budget.metric!r}; its metrics: "
                        f"{', '.join(names)}")


@dataclass(frozen=True)
class Space:
    """The axes of the sweep; every combination of them is one plan (tau "auto": calibrated per alpha and
    grid). `timed`: how many of the cheapest plans within the budget get exported and timed."""

    alpha: tuple[int, ...]
    grid: tuple[tuple[int, int], ...]
    iters: tuple[int, ...]
    reconstruct_from: tuple[str, ...]
    form: tuple[str, ...]
    tau: tuple[float | str, ...]
    baselines: tuple[str, ...] = BASELINES
    timed: int = DEFAULT_TIMED

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": list(self.alpha), "grid": [f"{h}x{w}" for h, w in self.grid], "iters": list(self.iters),
                "reconstruct_from": list(self.reconstruct_from), "form": list(self.form), "tau": list(self.tau),
                "baselines": list(self.baselines), "timed": self.timed}


def _spread(fractions: tuple[float, ...], top: int, low: int = 1) -> list[int]:
    return sorted({min(max(round(f * top), low), top) for f in fractions})


def default_space(facts: ModelFacts, request: PlanRequest, device: str) -> Space:
    """A space around the model's depth and token grid that always holds the recipe's own plan values.

    On a GPU both clustering forms are timed (the dense form won on an H100, the local one wins on CPUs);
    on a CPU "auto" picks the form with fewer MACs.
    """
    depth, (H, W) = facts.depth, facts.token_grid
    alphas = sorted(set(_spread(ALPHA_FRACTIONS, depth - 1)) | {request.alpha})
    sides = sorted({(max(1, round(f * H)), max(1, round(f * W))) for f in GRID_FRACTIONS} | {request.grid})
    opts = request.options
    iters = sorted(set(DEFAULT_ITERS) | {opts.get("iters", 5)})
    forms = ("dense", "local") if device == "gpu" else (opts.get("form", "auto"),)
    return Space(alpha=tuple(alphas), grid=tuple(sides), iters=tuple(iters), reconstruct_from=RECONSTRUCT_FROM,
                 form=forms, tau=(TAU_AUTO,))


SPACE_KEYS = {f.name for f in fields(Space)}


def read_space(path: str | Path) -> dict[str, Any]:
    """`--space FILE`: a [space] table whose keys replace the default space's axes (read and checked before
    any model is loaded; `replace(default_space(...), **values)` applies them)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"--space {p} does not exist; give a TOML file with a [space] table") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--space {p} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--space {p} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"space"})
    if extra or "space" not in data:
        raise UserError(f"--space {p}: expected one [space] table" + (f", not [{extra[0]}]" if extra else ""))
    body = data["space"]
    unknown = sorted(set(body) - SPACE_KEYS)
    if unknown:
        raise UserError(f"--space {p}: unknown key space.{unknown[0]} (known: {', '.join(sorted(SPACE_KEYS))})")
    values: dict[str, Any] = {}
    for key, value in body.items():
        where = f"--space {p}: space.{key}"
        if key == "timed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{where} must be a number of plans (0 or more)")
            values[key] = value
            continue
        if not isinstance(value, list) or (not value and key != "baselines"):
            raise UserError(f"{where} must be a non-empty list")
        values[key] = tuple(_axis(key, v, where) for v in value)
    return values


def _axis(key: str, v: Any, where: str) -> Any:
    """One value of an axis, checked."""
    if key == "grid":
        return parse_grid(v, where)
    if key in ("alpha", "iters"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{where}: {v!r} must be a positive whole number")
        return v
    if key == "tau":
        if v == TAU_AUTO or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            return v if v == TAU_AUTO else float(v)
        raise UserError(f"{where}: {v!r} must be a positive number or \"{TAU_AUTO}\"")
    allowed = {"reconstruct_from": RECONSTRUCT_FROM, "form": FORMS, "baselines": BASELINES}[key]
    if v not in allowed:
        raise UserError(f"{where}: {v!r} must be one of {', '.join(allowed)}")
    return v


@dataclass(frozen=True)
class Candidate:
    """One plan of the sweep: its request and the group it prunes within (same alpha and options)."""

    request: PlanRequest
    group: tuple[Any, ...]

    @property
    def key(self) -> str:
        return plan_key("clustering", self.request)


def plan_key(kind: str, request: PlanRequest | None = None, input_size: tuple[int, int] | None = None) -> str:
    """A stable name for a measured plan, so a resumed sweep finds what it already measured."""
    if input_size is not None:
        return f"{kind}:{input_size[0]}x{input_size[1]}"
    assert request is not None
    opts = ",".join(f"{k}={request.options[k]}" for k in sorted(request.options))
    return (f"{kind}:alpha={request.alpha},grid={request.grid[0]}x{request.grid[1]},"
            f"after={request.reconstruct_after},{opts}")


def candidates(space: Space, base: PlanRequest, facts: ModelFacts) -> Iterator[Candidate]:
    """Every plan of the space for this model, alpha ascending, grids descending within each group.

    The recipe's other [cluster] values (k, neighbours, reconstruction, reconstruct_on) stay as they are;
    its reconstruct_after stays unless a swept alpha reaches it (then the family's default applies). Grids
    larger than the token grid are left out.
    """
    H, W = facts.token_grid
    grids = sorted((g for g in space.grid if g[0] <= H and g[1] <= W), key=lambda g: -g[0] * g[1])
    for alpha, iters, rfrom, form, tau in itertools.product(sorted(space.alpha), space.iters, space.reconstruct_from,
                                                            space.form, space.tau):
        if not 1 <= alpha < facts.depth:
            continue
        kept = base.reconstruct_after is not None and base.reconstruct_after > alpha
        after = base.reconstruct_after if kept else None
        options = {**base.options, "iters": iters, "reconstruct_from": rfrom, "form": form, "tau": tau,
                   "method": "cluster"}
        for grid in grids:
            k = min(options.get("k", 20), grid[0] * grid[1])
            request = PlanRequest(alpha=alpha, grid=grid, reconstruct_after=after, options={**options, "k": k})
            yield Candidate(request, (alpha, iters, rfrom, form, str(tau)))


def pool_request(request: PlanRequest) -> PlanRequest:
    """The paper's average-pool + bilinear baseline at the same alpha, grid and reconstruction layer."""
    options = {k: v for k, v in request.options.items() if k in ("reconstruct_on", "k")}
    return PlanRequest(alpha=request.alpha, grid=request.grid, reconstruct_after=request.reconstruct_after,
                       options={**options, "method": "pool_bilinear"})
