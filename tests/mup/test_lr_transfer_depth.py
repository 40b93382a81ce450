"""The LR-transfer experiment across depth (lightning_optlab.mup.lr_transfer_depth, `optlab mup
lr-transfer` with a depth_transfer: recipe): config validation, the joint proxy → target gap,
seed pooling of both parts, reuse of the base-depth sweep, and a tiny end-to-end CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_optlab.mup import lr_transfer as lt
from lightning_optlab.mup import lr_transfer_depth as ld
from lightning_optlab.mup.cli import main

RECIPE = Path(__file__).parents[2] / "recipes" / "mup-lr-transfer-depth.yaml"
TINY = dict(width=32, depths=[2, 3], steps=3, eval_batches=1, eval_batch_size=4, seq_len=16, batch_size=2,
            optimizers={"adamw": {"log2_lrs": [-7, -6, -5]}}, joint={"proxy": [32, 2], "target": [64, 3]})


def par(vertex, grid, a=0.1, c=3.0):
    return [a * (x - vertex) ** 2 + c for x in grid]


def test_the_shipped_recipe_loads_with_the_five_optimizers():
    raw = yaml.safe_load(RECIPE.read_text())["depth_transfer"]
    cfg = ld.load_depth_config(raw, where=str(RECIPE))
    assert set(cfg.optimizers) == {"adamw", "lion", "sophia", "soap", "muon"}
    assert cfg.depths == [2, 4, 8, 16] and cfg.base_depth == 2 and cfg.joint_rules == ["none", "completep"]
    assert cfg.joint == {"proxy": [32, 2], "target": [128, 8]}


@pytest.mark.parametrize("bad,match", [
    ({"depths": [4]}, "at least two distinct"),
    ({"depth_rules": ["half"]}, "depth must be one of"),
    ({"joint": {"proxy": [64, 4], "target": [32, 2]}}, "wider and/or deeper"),
    ({"joint": {"proxy": [32]}}, "proxy: \\[width, depth\\]"),
    ({"optimizers": {"adamw": {"log2_lrs": [-7, -5, -4]}}}, "evenly spaced"),
    ({"optimizers": {"adamw": {"lr": 1}}}, "unknown keys"),
    ({"steps": 0}, "steps must be a positive"),
])
def test_config_errors_name_the_bad_value(bad, match):
    with pytest.raises(ValueError, match=match):
        ld.DepthTransferConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="unknown depth_transfer keys"):
        ld.load_depth_config({"widths": [32]})


def test_joint_gap_is_the_target_loss_at_the_proxys_lr_minus_its_best():
    grid = [-8.0, -7.0, -6.0, -5.0, -4.0]
    joint = {"adamw/none": {"log2_lrs": grid, "points": ["w32 L2", "w128 L8"],
                            "loss": {"w32 L2": par(-5.0, grid), "w128 L8": par(-7.0, grid)}}}
    g = ld.joint_gaps(joint)["adamw/none"]
    assert g["proxy_grid_best"] == -5.0 and g["target_grid_best"] == -7.0
    assert g["gap_nats"] == pytest.approx(0.1 * 4)  # the target's parabola two grid steps off its vertex
    assert g["gap_steps"] == pytest.approx(-2.0)
    joint["adamw/none"]["loss"]["w128 L8"][3] = math.inf  # diverged at the proxy's lr: an infinite gap
    assert ld.joint_gaps(joint)["adamw/none"]["gap_nats"] == math.inf


def test_depth_verdict_signs_the_drift():
    grid = [-8.0, -7.0, -6.0, -5.0, -4.0]
    results = {"adamw/none": {"log2_lrs": grid, "depths": [2, 4, 8],
                              "loss": {"2": par(-5.0, grid), "4": par(-6.0, grid), "8": par(-7.5, grid)}},
               "adamw/completep": {"log2_lrs": grid, "depths": [2, 4, 8],
                                   "loss": {"2": par(-5.0, grid), "4": par(-5.2, grid), "8": par(-4.9, grid)}}}
    summary = lt.summarize(results)
    assert summary["adamw/none"]["axis"] == "depth" and summary["adamw/none"]["sizes"] == [2, 4, 8]
    v = ld.depth_verdict(summary, max_shift=1.0)
    assert v["adamw/none"]["drift_steps"] == pytest.approx(-2.5) and not v["adamw/none"]["holds"]
    assert v["adamw/completep"]["shift_steps"] == pytest.approx(0.3) and v["adamw/completep"]["holds"]
    text = ld.format_depth_summary(summary, None)
    assert "adamw/none" in text and "-2.50" in text and "holds" in text


@pytest.fixture(scope="module")
def two_seeds():
    import torch

    torch.set_num_threads(1)
    cfg = ld.DepthTransferConfig(**TINY, seeds=[0, 1])
    return cfg, ld.run_depth(cfg, progress=False)


def test_a_seed_sweeps_every_rule_and_depth_and_reuses_the_base_depth(two_seeds):
    cfg, (rec, _) = two_seeds
    assert set(rec["results"]) == {"adamw/none", "adamw/depth_mup", "adamw/completep"}
    assert set(rec["joint"]) == {"adamw/none", "adamw/completep"}
    rows = {k: r["loss"] for k, r in rec["results"].items()}
    # the base depth is width-only μP exactly under every rule; deeper, the rules differ
    assert rows["adamw/none"]["2"] == rows["adamw/completep"]["2"] == rows["adamw/depth_mup"]["2"]
    assert rows["adamw/none"]["3"] != rows["adamw/completep"]["3"]
    assert rec["joint"]["adamw/none"]["loss"]["w32 L2"] == rec["joint"]["adamw/completep"]["loss"]["w32 L2"]
    assert all(math.isfinite(v) for r in rows.values() for row in r.values() for v in row)


def test_pooling_averages_both_parts_by_seed(two_seeds):
    _, (a, b) = two_seeds
    pooled = lt.combine([a, b])
    assert pooled["seeds"] == [0, 1] and set(pooled["joint"]) == set(a["joint"])
    got = pooled["joint"]["adamw/none"]["loss"]["w64 L3"]
    want = [(x + y) / 2 for x, y in zip(a["joint"]["adamw/none"]["loss"]["w64 L3"], b["joint"]["adamw/none"]["loss"]["w64 L3"])]
    assert got == pytest.approx(want)
    assert pooled["results"]["adamw/completep"]["depths"] == [2, 3]
    assert pooled["results"]["adamw/completep"]["best_per_seed"]["3"] == pytest.approx(
        [min(a["results"]["adamw/completep"]["loss"]["3"]), min(b["results"]["adamw/completep"]["loss"]["3"])])


def test_cli_runs_the_depth_recipe_writes_the_figure_and_pools(tmp_path, capsys):
    recipe = tmp_path / "depth.yaml"
    recipe.write_text(yaml.safe_dump({"depth_transfer": {**TINY, "depth_rules": ["none", "completep"], "seeds": [0]}}))
    out = tmp_path / "d.png"
    assert main(["lr-transfer", "--config", str(recipe), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "depth alone" in text and "proxy → target" in text and "nats" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["kind"] == "depth" and set(doc["joint_gaps"]) == {"adamw/none", "adamw/completep"}
    assert set(doc["verdict"]) == {"adamw/none", "adamw/completep"} and out.stat().st_size > 10_000
    seed0 = tmp_path / "d_seed0.json"
    assert seed0.exists()
    assert main(["lr-transfer", "--combine", str(seed0), str(seed0), "--out", str(tmp_path / "p.png")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["seeds"] == [0, 0]
    assert main(["lr-transfer", "--config", str(recipe), "--widths", "32", "64", "--out", str(out)]) == 2
    assert "one width" in capsys.readouterr().err
