"""Every recipe: a header naming its finding and source, a tiny-scale dry run, a paper scale of the studies' size."""

import re
from pathlib import Path

import pytest
import torch

from lightning_optlab.cli import check_config
from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.models import build_model
from lightning_optlab.sweep import SweepSpec, deep_merge, expand_points, point_config, resolve_recipe

RECIPES = sorted(p for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml") if not p.name.startswith("mup-"))


def test_the_studies_have_recipes():
    names = {p.stem for p in RECIPES}
    assert {"lr_sweep", "momentum_sweep", "adam_vs_signum", "adalayer_ablations", "soap_vs_adamw_shampoo",
            "soap_precondition_frequency", "adamw_lion_sophia_budget"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_finding_and_source(path):
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("# Finding:")
    assert re.search(r"Source: .*\(arXiv \d{4}\.\d{5}\)", head.replace("\n# ", " "))
    assert f"optlab sweep recipes/{path.name} --scale tiny" in head and "--scale paper" in head


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recipe_data"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_tiny_scale_dry_run_builds_data_model_and_every_optimizer(path, data_dir):
    torch.set_num_threads(1)
    config, sweep = resolve_recipe(path, "tiny")
    config = deep_merge(config, {"data": {"work_dir": data_dir}})
    info = check_config(config, sweep=sweep)
    spec = SweepSpec.from_dict(sweep)
    assert set(info["optimizers"]) == {"(recipe)"} | {r.label for r in spec.runs}
    assert info["params"] < 1_000_000 and info["max_steps"] <= 400  # tiny: minutes on a CPU core
    assert info["batch_shape"][1] == config["data"]["seq_len"] + 1
    assert info["points"] == len(expand_points(spec)) <= 30


def _tokens_per_step(config: dict) -> int:
    t, d = config["trainer"], config["data"]
    return d["batch_size"] * d["seq_len"] * t.get("devices", 1) * t.get("num_nodes", 1) * t.get("accumulate_grad_batches", 1)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_paper_scale_is_the_studies_set_up(path):
    config, sweep = resolve_recipe(path, "paper")
    assert _tokens_per_step(config) == 256 * 512  # 256 sequences of 512 tokens
    spec = SweepSpec.from_dict(sweep)
    sizes: dict[str, int] = {}
    for point in expand_points(spec):
        cfg = point_config(config, spec, point)
        # every point's optimizer block is valid (total_steps: trainer.max_steps, as `optlab fit` sets it)
        OptimizerSpec(**{"total_steps": cfg["trainer"]["max_steps"], **cfg["optimizer"]})
        key = repr(sorted(cfg["model"]["model"].items()))
        if key not in sizes:
            with torch.device("meta"):
                sizes[key] = build_model(cfg["model"]["model"], vocab_size=config["data"]["vocab_size"]).num_params()
        n = sizes[key]
        tokens = cfg["trainer"]["max_steps"] * _tokens_per_step(cfg)
        budget_study = "budget" in path.stem  # Schlotthauer et al.: a fixed 60B tokens for ~2.7B parameters
        assert (abs(tokens - 60e9) / 60e9 < 0.01) if budget_study else (15 <= tokens / n <= 25), (point.name, tokens / n)
