"""Recipes and sweep specs: scales merge, grids expand, axes land where they belong, bad specs are named."""

import pytest

from lightning_optlab.sweep import SweepSpec, deep_merge, expand_points, point_config, resolve_recipe

BASE = {"optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "hparams": {"foo": 1}},
        "trainer": {"max_steps": 10, "callbacks": [1, 2]}}


def test_deep_merge_merges_mappings_and_replaces_lists():
    merged = deep_merge(BASE, {"trainer": {"max_steps": 5, "callbacks": [3]}, "data": {"seq_len": 8}})
    assert merged["trainer"] == {"max_steps": 5, "callbacks": [3]} and merged["data"] == {"seq_len": 8}
    assert merged["optimizer"] == BASE["optimizer"] and BASE["trainer"]["max_steps"] == 10  # inputs untouched


def test_resolve_recipe_picks_a_scale_and_its_sweep():
    recipe = {**BASE, "sweep": {"grid": {"lr": [1, 2]}, "runs": [{"label": "a"}]},
              "scales": {"tiny": {"trainer": {"max_steps": 3}, "sweep": {"grid": {"lr": [5]}}},
                         "paper": {"trainer": {"max_steps": 9000}}}}
    tiny, tiny_sweep = resolve_recipe(recipe, "tiny")
    paper, paper_sweep = resolve_recipe(recipe, "paper")
    assert tiny["trainer"]["max_steps"] == 3 and tiny_sweep["grid"] == {"lr": [5]}
    assert paper["trainer"]["max_steps"] == 9000 and paper_sweep["grid"] == {"lr": [1, 2]}
    assert "scales" not in tiny and "sweep" not in tiny
    assert resolve_recipe(recipe)[0] == tiny  # tiny is the default
    with pytest.raises(ValueError, match="scale must be one of tiny, small, paper, got 'medium'"):
        resolve_recipe(recipe, "medium")
    with pytest.raises(ValueError, match=r"unknown scale\(s\) \['huge'\]"):
        resolve_recipe({**recipe, "scales": {"huge": {}}})


def test_points_cover_runs_grid_and_seeds_and_set_their_values():
    spec = SweepSpec.from_dict({
        "grid": {"lr": [1e-3, 3e-3], "momentum": [0.8, 0.9]}, "seeds": [0, 1],
        "runs": [{"label": "adam", "optimizer": {"name": "adamw"}},
                 {"label": "sgd", "optimizer": {"name": "sgd", "betas": [0.98, 0.0]}, "grid": {"lr": [0.1]}}]})
    points = expand_points(spec)
    assert len(points) == 2 * 2 * 2 + 1 * 2
    assert points[0].name == "adam__lr=0.001__momentum=0.8__seed=0"
    cfg = point_config(BASE, spec, points[3])  # adam, lr 1e-3, momentum 0.9, seed 1
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["optimizer"]["betas"] == [0.9, 0.95] and cfg["seed_everything"] == 1
    cfg = point_config(BASE, spec, points[2])
    assert cfg["optimizer"]["betas"] == [0.9, 0.95] and BASE["optimizer"]["betas"] == [0.9, 0.95]
    cfg = point_config(BASE, spec, points[1])
    assert cfg["optimizer"]["betas"] == [0.8, 0.95]
    sgd = point_config(BASE, spec, points[-1])
    # another algorithm: the base block's betas/eps/hparams do not carry over, the run's do
    assert sgd["optimizer"] == {"name": "sgd", "lr": 0.1, "betas": [0.98, 0.0]}


def test_seeds_at_gives_chosen_points_their_own_seeds():
    spec = SweepSpec.from_dict({
        "grid": {"lr": [1e-3, 3.16e-3, 1e-2]}, "seeds": [0],
        "runs": [{"label": "adam", "seeds_at": [{"lr": 3.16e-3, "seeds": [0, 1, 2]}, {"lr": 0.01, "seeds": [5]}]},
                 {"label": "sgd", "grid": {"lr": [0.1, 0.3]}, "seeds_at": [{"lr": 0.3, "seeds": [1]}]}]})
    names = [p.name for p in expand_points(spec)]
    assert names == ["adam__lr=0.001__seed=0", "adam__lr=0.00316__seed=0", "adam__lr=0.00316__seed=1",
                     "adam__lr=0.00316__seed=2", "adam__lr=0.01__seed=5", "sgd__lr=0.1__seed=0", "sgd__lr=0.3__seed=1"]
    cfg = point_config(BASE, spec, expand_points(spec)[3])
    assert cfg["seed_everything"] == 2 and cfg["optimizer"]["lr"] == 3.16e-3


@pytest.mark.parametrize("seeds_at, message", [
    ([{"lr": 3e-3}], r"names the grid values and their seeds"),
    ([{"lr": 2e-3, "seeds": [1]}], r"lr=0.002 is not in the run's grid \[0.001, 0.003\]"),
    ([{"seeds": [1]}], r"must give a value for each grid axis \(lr\)"),
    ([{"lr": 3e-3, "momentum": 0.9, "seeds": [1]}], "and only those"),
    ([{"lr": 3e-3, "seeds": [1, 1]}], "seeds_at seeds must be a non-empty list of distinct integers"),
    ([{"lr": 3e-3, "seeds": [1]}, {"lr": 3e-3, "seeds": [2]}], "names the point"),
    ({"lr": 3e-3, "seeds": [1]}, "must be a list like"),
])
def test_bad_seeds_at_is_named(seeds_at, message):
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_dict({"grid": {"lr": [1e-3, 3e-3]}, "runs": [{"label": "a", "seeds_at": seeds_at}]})


def test_dotted_axes_reach_any_config_key():
    spec = SweepSpec.from_dict({"grid": {"optimizer.hparams.precondition_frequency": [1, 10]},
                                "runs": [{"label": "soap", "optimizer": {"name": "soap", "hparams": {"x": 2}}}]})
    points = expand_points(spec)
    assert points[1].name == "soap__precondition_frequency=10__seed=0"
    assert point_config({"optimizer": {"name": "soap"}}, spec, points[1])["optimizer"]["hparams"] == {
        "x": 2, "precondition_frequency": 10}


@pytest.mark.parametrize("sweep, message", [
    ({"runs": []}, "sweep.runs is empty"),
    ({"runs": [{"label": "a"}, {"label": "a"}]}, r"labels must be unique, \['a'\] repeat"),
    ({"runs": [{"label": "a b"}]}, "must use letters, digits"),
    ({"grid": {"lr": [1], "beta2": [1], "eps": [1]}, "runs": [{"label": "a"}]}, "one or two axes"),
    ({"grid": {"lr": []}, "runs": [{"label": "a"}]}, "non-empty list"),
    ({"seeds": [0, 0], "runs": [{"label": "a"}]}, "distinct integers"),
    ({"reference": "b", "runs": [{"label": "a"}]}, "sweep.reference 'b' is not a run label"),
    ({"tolerence": 0.1, "runs": [{"label": "a"}]}, r"unknown sweep key\(s\) \['tolerence'\]"),
])
def test_bad_sweep_specs_are_named(sweep, message):
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_dict(sweep)


def test_a_momentum_axis_needs_explicit_betas():
    spec = SweepSpec.from_dict({"grid": {"momentum": [0.9]}, "runs": [{"label": "a", "optimizer": {"name": "lion"}}]})
    with pytest.raises(ValueError, match="run 'a' must give betas explicitly"):
        point_config({"optimizer": {"name": "adamw"}}, spec, expand_points(spec)[0])
