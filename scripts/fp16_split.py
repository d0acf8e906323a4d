"""Which parts of the clustering layer may run in fp16: the measurement behind layers.mixing.

For each recipe (at its own size), the clustering layer's input tokens on the bundled photos are caught, rounded
to fp16 (they reach the layer in fp16 in an fp16 engine), and the layer is run four ways against itself in fp32:
its weighted sums in fp16 (WeightedSum's operands and result rounded to fp16, accumulation in fp32, as GPU GEMMs
do), its E-step distance GEMM in fp16 likewise, and, for scale, the fp32 layer on tokens with a 1e-3 relative
noise. Per way: the worst centre's cosine to fp32 and the largest error relative to the largest centre value.
Writes scripts/results/fp16_split.json.

    python scripts/fp16_split.py                          # timm_vit_b16, depth_anything_small, dinov2_s14_focus
    python scripts/fp16_split.py segmenter_vit_l16_ade20k --set model.input_size=320x320 --set cluster.grid=14x14
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hgdeploy import (TokenClustering, WeightedSum, build_models, exit_code, load_recipe, sample_photos, to_batch, to_json,
                      write_atomic)

RESULTS = Path(__file__).resolve().parent / "results" / "fp16_split.json"
RECIPES = ("timm_vit_b16", "depth_anything_small", "dinov2_s14_focus")
PHOTOS = 4


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def layer_input(recipe: str, sets: list[str]) -> tuple[TokenClustering, torch.Tensor]:
    """The recipe's clustering layer (dense form: the GPU's) and its input tokens on the photos, in fp16."""
    models = build_models(load_recipe(recipe, sets), device="gpu",
                          calibration=lambda pre: to_batch(sample_photos()[:2], pre))
    layer = next(m for m in models.patched.modules() if isinstance(m, TokenClustering))
    caught: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda m, args: caught.append(args[0].detach()))
    with torch.no_grad():
        models.patched(to_batch(sample_photos()[:PHOTOS], models.preprocess))
    hook.remove()
    return layer, half(caught[0])


def with_fp16_sums(layer: TokenClustering, z: torch.Tensor) -> torch.Tensor:
    sums = [m for m in layer.modules() if isinstance(m, WeightedSum)]
    hooks = [m.register_forward_pre_hook(lambda m, args: tuple(half(a) for a in args)) for m in sums]
    hooks += [m.register_forward_hook(lambda m, args, out: half(out)) for m in sums]
    try:
        return layer(z)
    finally:
        for h in hooks:
            h.remove()


def with_fp16_distances(layer: TokenClustering, z: torch.Tensor) -> torch.Tensor:
    """The dense E-step's distance GEMM (its only torch.matmul) with fp16 operands and result."""
    matmul = torch.matmul
    torch.matmul = lambda a, b: half(matmul(half(a), half(b)))
    try:
        return layer(z)
    finally:
        torch.matmul = matmul


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"worst_centre_cosine": torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item(),
            "max_abs_rel": ((got - ref).abs().max() / ref.abs().max()).item()}


def measure(recipe: str, sets: list[str]) -> dict:
    layer, z = layer_input(recipe, sets)
    noisy = z * (1 + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ref = layer(z)
        ways = {"weighted_sums_fp16": with_fp16_sums(layer, z), "distance_gemm_fp16": with_fp16_distances(layer, z),
                "tokens_1e-3_noise": layer(noisy)}
    return {"recipe": recipe, "set": sets, "layer": layer.spec, "photos": PHOTOS,
            "token_norm_median": z.norm(dim=-1).median().item(),
            **{way: compare(out, ref) for way, out in ways.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--set", action="append", default=[], help="recipe override for every recipe named")
    args = parser.parse_args()
    rows = [measure(r, args.set) for r in args.recipes]
    for row in rows:
        cells = "  ".join(f"{way} {row[way]['worst_centre_cosine']:.6f}"
                          for way in ("weighted_sums_fp16", "distance_gemm_fp16", "tokens_1e-3_noise"))
        print(f"{row['recipe']:24s} tau {row['layer']['tau']:<8.3g} worst centre cosine: {cells}")
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old.update({r["recipe"]: r for r in rows})
    write_atomic(RESULTS, to_json(old))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "fp16_split.py"))
