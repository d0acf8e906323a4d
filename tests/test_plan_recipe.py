"""Plan validation and recipe parsing: every impossible value gives a named error."""

from __future__ import annotations

import pytest

from hgdeploy.core.errors import UserError
from hgdeploy.core.plan import ClusterPlan, parse_grid
from hgdeploy.core.recipe import load_recipe, parse_override

GOOD = dict(token_grid=(32, 32), grid=(24, 24), alpha=6, reconstruct_after=12, depth=12, neighbours=5, iters=5, tau=0.1, k=20)


def test_good_plan_builds():
    plan = ClusterPlan(**GOOD)
    assert plan.num_clusters == 576 and plan.to_dict()["grid"] == "24x24"


@pytest.mark.parametrize("change,needle", [
    ({"grid": (33, 32)}, "larger than the token grid"),
    ({"alpha": 0}, "cluster.alpha"),
    ({"alpha": 12}, "cluster.alpha"),
    ({"reconstruct_after": 6}, "cluster.reconstruct_after"),
    ({"reconstruct_after": 13}, "cluster.reconstruct_after"),
    ({"neighbours": 4}, "odd"),
    ({"neighbours": 0}, "odd"),
    ({"tau": 0.0}, "cluster.tau"),
    ({"tau": -1.0}, "cluster.tau"),
    ({"k": 577}, "cluster.k"),
    ({"iters": 0}, "cluster.iters"),
    ({"reconstruction": "exp"}, "cluster.reconstruction"),
])
def test_impossible_plans_are_refused(change, needle):
    with pytest.raises(UserError, match=needle):
        ClusterPlan(**(GOOD | change))


@pytest.mark.parametrize("text,expected", [("24x24", (24, 24)), ("20X28", (20, 28)), (16, (16, 16)), ([3, 4], (3, 4))])
def test_parse_grid(text, expected):
    assert parse_grid(text) == expected


def test_parse_grid_rejects_garbage():
    with pytest.raises(UserError, match="24x24"):
        parse_grid("big")


def test_default_recipe_loads_and_overrides_apply():
    recipe = load_recipe(None, ["cluster.tau=0.5", "cluster.grid=20x20"])
    assert recipe.data["cluster"]["tau"] == 0.5
    assert recipe.data["cluster"]["grid"] == "20x20"
    assert recipe.name == "dinov2_s14_focus"


def test_override_parsing():
    assert parse_override("cluster.k=8") == ("cluster", "k", 8)
    assert parse_override("model.checkpoint=/x/y.pt") == ("model", "checkpoint", "/x/y.pt")
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("tau=3")


def test_misspelled_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\nfamily = "dinov2_focus"\ninput_size = 224\n[cluster]\nalpha = 6\ngrid = "8x8"\ntua = 0.1\n')
    with pytest.raises(UserError, match=r"cluster\.tua.*did you mean cluster\.tau"):
        load_recipe(str(path))


def test_misspelled_override_is_refused():
    with pytest.raises(UserError, match="did you mean cluster.alpha"):
        load_recipe(None, ["cluster.alhpa=3"])


def test_wrong_type_and_missing_required(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\nfamily = "dinov2_focus"\ninput_size = 224\n[cluster]\nalpha = "six"\ngrid = "8x8"\n')
    with pytest.raises(UserError, match="cluster.alpha"):
        load_recipe(str(path))
    path.write_text('[model]\nfamily = "dinov2_focus"\n[cluster]\nalpha = 6\ngrid = "8x8"\n')
    with pytest.raises(UserError, match="model.input_size"):
        load_recipe(str(path))


def test_missing_recipe_file_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(str(bad))
