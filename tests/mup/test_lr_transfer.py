"""The LR-transfer experiment (lightning_optlab.mup.lr_transfer, `optlab mup lr-transfer`): estimators,
seed pooling, config validation, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_optlab.mup import lr_transfer as lt
from lightning_optlab.mup.cli import main

RECIPE = Path(__file__).parents[2] / "recipes" / "mup-lr-transfer.yaml"


@pytest.mark.parametrize("vertex,step", [(-5.3, 1.0), (-8.75, 0.5), (-2.0, 1.0)])
def test_fitted_optimum_recovers_the_vertex_of_a_parabola(vertex, step):
    rng = np.random.default_rng(0)
    xs = [-10 + step * i for i in range(12)]
    a, c = rng.uniform(0.05, 0.5), rng.uniform(2, 4)
    ys = [a * (x - vertex) ** 2 + c for x in xs]
    assert lt.fitted_log2_optimum(xs, ys) == pytest.approx(vertex, abs=1e-9)
    # diverged points (inf) are left out of the fit, not treated as losses
    ys[-1] = math.inf
    ys[0] = math.nan
    assert lt.fitted_log2_optimum(xs, ys) == pytest.approx(vertex, abs=1e-9)


def test_fitted_optimum_is_least_squares_and_refuses_what_has_no_minimum():
    xs = [-3.0, -2.0, -1.0, 0.0]
    ys = [3.1, 2.2, 2.05, 2.6]
    a, b, _ = np.polyfit(np.array(xs), np.array(ys), 2)  # independent: numpy's own least squares
    assert lt.fitted_log2_optimum(xs, ys) == pytest.approx(-b / (2 * a))
    assert lt.fitted_log2_optimum(xs, [1.0, 2.0, 2.5, 2.7]) is None  # concave: no interior minimum
    assert lt.fitted_log2_optimum(xs, [1.0, math.inf, math.inf, 2.0]) is None  # < 3 finite points
    assert lt.grid_best(xs, ys) == -1.0
    assert lt.grid_best(xs, [math.inf] * 4) is None


def _record(seeds, rows_by_width, grid=(-3.0, -2.0, -1.0)):
    res = {"log2_lrs": list(grid), "widths": [int(w) for w in rows_by_width],
           "loss": {str(w): list(r) for w, r in rows_by_width.items()}}
    return {"seeds": list(seeds), "results": {"adamw/mup": res, "adamw/sp": json.loads(json.dumps(res))}}


def test_combine_weights_by_seed_count_and_propagates_divergence():
    a = _record([0, 1], {32: [3.0, 2.0, 4.0], 64: [3.0, 2.0, math.inf]})
    b = {**_record([2], {32: [6.0, 5.0, 1.0], 64: [3.0, 2.0, 1.0]}), "seed": 2}
    b.pop("seeds")
    out = lt.combine([a, b])
    assert out["seeds"] == [0, 1, 2]
    assert out["results"]["adamw/mup"]["loss"]["32"] == pytest.approx([4.0, 3.0, 3.0])  # (2·a + b) / 3
    assert out["results"]["adamw/mup"]["loss"]["64"][:2] == pytest.approx([3.0, 2.0])
    assert out["results"]["adamw/mup"]["loss"]["64"][2] == math.inf
    bad = _record([3], {32: [1.0, 1.0, 1.0], 64: [1.0, 1.0, 1.0]}, grid=(-4.0, -3.0, -2.0))
    with pytest.raises(ValueError, match="do not share one grid"):
        lt.combine([a, bad])


def test_summary_counts_shifts_in_grid_steps_and_gives_the_verdict():
    grid = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5]  # spacing 0.5: a shift of 1.0 in log2 is 2 grid steps
    par = lambda v: [0.3 * (x - v) ** 2 + 2 for x in grid]  # noqa: E731
    results = {
        "lion/mup": {"log2_lrs": grid, "widths": [32, 64, 128], "loss": {"32": par(-3.0), "64": par(-2.9), "128": par(-2.8)}},
        "lion/sp": {"log2_lrs": grid, "widths": [32, 64, 128], "loss": {"32": par(-2.0), "64": par(-2.5), "128": par(-3.5)}},
    }
    s = lt.summarize(results)
    assert s["lion/mup"]["fitted_shift_steps"] == pytest.approx(0.4)
    assert s["lion/sp"]["fitted_shift_steps"] == pytest.approx(3.0)
    assert s["lion/sp"]["grid_best_log2_lr"] == {32: -2.0, 64: -2.5, 128: -3.5}
    v = lt.verdict(s)
    assert v["lion"]["transfers"] is True
    assert lt.verdict(s, max_mup_shift=0.3)["lion"]["transfers"] is False
    text = lt.format_summary(s)
    assert "lion: fitted optimum moves 0.40 grid steps under μP, 3.00 under SP: transfers" in text


def test_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="base_width 64 is wider than the narrowest width 32"):
        lt.LRTransferConfig(widths=[32, 64], base_width=64)
    with pytest.raises(ValueError, match="evenly spaced"):
        lt.LRTransferConfig(optimizers={"adamw": {"log2_lrs": [-5, -4, -2]}})
    with pytest.raises(ValueError, match="at least 3 learning rates"):
        lt.LRTransferConfig(optimizers={"adamw": {"log2_lrs": [-5, -4]}})
    with pytest.raises(ValueError, match="unknown optimizer 'adamq'"):
        lt.LRTransferConfig(optimizers={"adamq": {"log2_lrs": [-5, -4, -3]}})
    with pytest.raises(ValueError, match="no μP rule"):
        lt.LRTransferConfig(optimizers={"shampoo": {"log2_lrs": [-5, -4, -3], "hparams": {"grafting": "none"}}})
    with pytest.raises(ValueError, match="at least two distinct widths"):
        lt.LRTransferConfig(widths=[64])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_transfer:\n  widths: [32, 64]\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown lr_transfer keys \['stepz'\]"):
        lt.load_config(bad)
    assert main(["lr-transfer", "--config", str(bad), "--out", str(tmp_path / "x.png")]) == 2


def test_the_shipped_recipe_loads():
    cfg = lt.load_config(RECIPE)
    assert cfg.widths == [32, 64, 128, 256] and cfg.base_width == 32 and len(cfg.seeds) >= 3
    assert set(cfg.optimizers) >= {"adamw", "lion", "sophia"}
    assert all(len(spec["log2_lrs"]) >= 5 for spec in cfg.optimizers.values())
    assert lt.load_config(RECIPE, steps=7, seeds=[9]).steps == 7


def test_the_head_size_recipe_is_the_shipped_experiment_with_only_the_head_size_kept():
    # docs/mup.md's "after" table: any other difference would confound the fix with something else
    import dataclasses

    base = lt.load_config(RECIPE)
    head8 = lt.load_config(RECIPE.with_name("mup-lr-transfer-head8.yaml"))
    assert head8.head_dim == 8 and base.head_dim is None
    assert all(w % 8 == 0 for w in head8.widths)
    assert set(head8.optimizers) == {"adamw", "lion"}
    assert {k: head8.optimizers[k] for k in head8.optimizers} == {k: base.optimizers[k] for k in head8.optimizers}
    same = {f.name for f in dataclasses.fields(base)} - {"head_dim", "optimizers", "seeds"}
    assert {k: getattr(head8, k) for k in same} == {k: getattr(base, k) for k in same}
    assert lt.model_overrides(head8) == {**lt.model_overrides(base), "head_dim": 8}


def test_cli_runs_only_the_optimizers_asked_for(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "lr_transfer:\n  widths: [16, 32]\n  base_width: 16\n  steps: 2\n  batch_size: 2\n  seq_len: 16\n"
        "  eval_batches: 1\n  eval_batch_size: 2\n  seeds: [0]\n"
        "  optimizers:\n    lion:\n      log2_lrs: [-10, -8, -6]\n    adamw:\n      log2_lrs: [-8, -6, -4]\n"
    )
    out = tmp_path / "lt.png"
    assert main(["lr-transfer", "--config", str(recipe), "--optimizers", "adamw", "--out", str(out)]) == 0
    assert set(json.loads(out.with_suffix(".json").read_text())["results"]) == {"adamw/mup", "adamw/sp"}
    assert main(["lr-transfer", "--config", str(recipe), "--optimizers", "sophia", "--out", str(out)]) == 2
    assert "--optimizers sophia: not among the recipe's optimizers (lion, adamw)" in capsys.readouterr().err


def test_cli_runs_seeds_writes_jsons_and_plot_and_pools_them(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "lr_transfer:\n  widths: [16, 32]\n  base_width: 16\n  steps: 3\n  batch_size: 2\n  seq_len: 16\n"
        "  eval_batches: 1\n  eval_batch_size: 2\n  seeds: [0, 1]\n"
        "  optimizers:\n    lion:\n      log2_lrs: [-10, -8, -6]\n"
    )
    out = tmp_path / "lt.png"
    assert main(["lr-transfer", "--config", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss averaged over seeds [0, 1]" in printed and "lion: fitted optimum moves" in printed
    assert out.exists() and out.stat().st_size > 10_000
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["seeds"] == [0, 1] and set(doc["results"]) == {"lion/mup", "lion/sp"}
    s0 = json.loads((tmp_path / "lt_seed0.json").read_text())
    s1 = json.loads((tmp_path / "lt_seed1.json").read_text())
    for w in ("16", "32"):
        mean = [(a + b) / 2 for a, b in zip(s0["results"]["lion/mup"]["loss"][w], s1["results"]["lion/mup"]["loss"][w])]
        assert doc["results"]["lion/mup"]["loss"][w] == pytest.approx(mean)
    # at the base width μP is SP exactly: same losses at every learning rate
    assert s0["results"]["lion/mup"]["loss"]["16"] == s0["results"]["lion/sp"]["loss"]["16"]
    assert s0["results"]["lion/mup"]["loss"]["32"] != s0["results"]["lion/sp"]["loss"]["32"]
    # pooling: the combined JSON (weight 2) with seed 0 again (weight 1)
    pooled = tmp_path / "pooled.png"
    assert main(["lr-transfer", "--combine", str(out.with_suffix(".json")), str(tmp_path / "lt_seed0.json"),
                 "--out", str(pooled)]) == 0
    doc2 = json.loads(pooled.with_suffix(".json").read_text())
    assert doc2["seeds"] == [0, 1, 0]
    expect = [(2 * m + a) / 3 for m, a in zip(doc["results"]["lion/sp"]["loss"]["32"], s0["results"]["lion/sp"]["loss"]["32"])]
    assert doc2["results"]["lion/sp"]["loss"]["32"] == pytest.approx(expect)


def test_parallel_seeds_give_the_same_numbers_as_sequential_ones():
    cfg = lt.LRTransferConfig(widths=[16, 32], base_width=16, steps=2, batch_size=2, seq_len=16, eval_batches=1,
                              eval_batch_size=2, seeds=[0, 1], optimizers={"adamw": {"log2_lrs": [-8, -6, -4]}})
    saved = []
    parallel = lt.run(cfg, jobs=2, progress=False, save=lambda rec: saved.append(rec["seed"]))
    sequential = lt.run(cfg, jobs=1, progress=False)
    assert sorted(saved) == [0, 1] and [r["seed"] for r in parallel] == [0, 1]
    for a, b in zip(parallel, sequential):
        assert a["results"] == b["results"]


def _two_seed_results(mup_best, sp_best, grid=(-3.0, -2.0, -1.0)):
    """One-seed records whose curves have their minimum (the given best loss) at log2 lr -2."""
    recs = []
    for seed, jitter in ((0, -0.01), (1, 0.01)):
        results = {}
        for par, bests in (("mup", mup_best), ("sp", sp_best)):
            results[f"adamw/{par}"] = {"log2_lrs": list(grid), "widths": [32, 64, 128],
                                       "loss": {str(w): [b + jitter + 0.5, b + jitter, b + jitter + 0.3]
                                                for w, b in zip((32, 64, 128), bests)}}
        recs.append({"seed": seed, "seeds": [seed], "results": results})
    return recs


def test_best_loss_per_width_and_its_seed_spread_survive_pooling():
    pooled = lt.combine(_two_seed_results([3.0, 2.9, 2.8], [3.0, 2.95, 2.9]))
    res = pooled["results"]["adamw/mup"]
    assert res["best_per_seed"]["64"] == pytest.approx([2.89, 2.91])
    s = lt.summarize(pooled["results"])
    assert s["adamw/mup"]["best_loss"] == pytest.approx({32: 3.0, 64: 2.9, 128: 2.8})
    assert s["adamw/mup"]["best_loss_seed_std"][128] == pytest.approx(0.02 / math.sqrt(2))
    # pooling a pooled record again keeps every seed's best (weights: 2 seeds + 1)
    again = lt.combine([pooled, _two_seed_results([3.0, 2.9, 2.8], [3.0, 2.95, 2.9])[0]])
    assert len(again["results"]["adamw/sp"]["best_per_seed"]["32"]) == 3


def test_quality_verdict_wider_is_better_and_not_worse_than_sp():
    good = lt.verdict(lt.summarize(lt.combine(_two_seed_results([3.0, 2.9, 2.8], [3.0, 2.95, 2.9]))["results"]))
    assert good["adamw"]["wider_is_better"] is True and good["adamw"]["not_worse_than_sp"] is True
    assert good["adamw"]["mup_minus_sp_best_loss"][128] == pytest.approx(-0.1)
    # the picture: μP flat with width while SP improves by more than the seed spread
    bad = lt.verdict(lt.summarize(lt.combine(_two_seed_results([2.87, 2.89, 2.85], [2.87, 2.80, 2.63]))["results"]))
    assert bad["adamw"]["wider_is_better"] is False and bad["adamw"]["not_worse_than_sp"] is False
    text = lt.format_summary(lt.summarize(lt.combine(_two_seed_results([2.87, 2.89, 2.85], [2.87, 2.80, 2.63]))["results"]))
    assert "μP's best loss does NOT fall with width" in text and "μP WORSE than SP" in text
    assert "best    2.870  2.890  2.850" in text


def test_figure_has_a_best_loss_vs_width_panel_with_the_summary_numbers():
    import matplotlib.pyplot as plt

    pooled = lt.combine(_two_seed_results([3.0, 2.9, 2.8], [3.0, 2.95, 2.9]))
    s = lt.summarize(pooled["results"])
    fig = lt.figure(pooled["results"], s, "t")
    try:
        panel = [ax for ax in fig.axes if "best loss vs width" in ax.get_title()]
        assert len(panel) == 1
        ys = sorted(tuple(line.get_ydata()) for line in panel[0].lines if line.get_marker() in ("o", "s"))
        assert ys == sorted([tuple(s["adamw/mup"]["best_loss"].values()), tuple(s["adamw/sp"]["best_loss"].values())])
        assert panel[0].get_xscale() == "log"
        assert panel[0].containers and panel[0].containers[0].has_yerr  # the seeds' spread is drawn
    finally:
        plt.close(fig)


def test_head_dim_keeps_the_head_size_at_every_width_and_in_the_base():
    import torch

    from lightning_optlab.mup.experiment import width_model

    torch.manual_seed(0)
    wide = width_model("llama-tiny", 128, mup=True, base_width=32, seed=0, head_dim=8)
    assert (wide.config.n_head, wide.config.head_dim) == (16, 8)
    assert wide.optlab_mup_base.n_head == 4 and wide.optlab_mup_base.head_dim == 8
    sp = width_model("llama-tiny", 128, mup=False, base_width=32, seed=0, head_dim=8)
    assert wide.config.softmax_scale == pytest.approx(sp.config.softmax_scale) == pytest.approx(8 ** -0.5)
    kept = width_model("llama-tiny", 128, mup=True, base_width=32, seed=0)  # head count kept: 1/d shrinks it
    assert kept.config.head_dim == 32 and kept.config.softmax_scale == pytest.approx(8 ** -0.5 * 8 / 32)
    with pytest.raises(ValueError, match="head_dim 12 must divide"):
        width_model("llama-tiny", 128, mup=True, base_width=32, seed=0, head_dim=12)
    assert lt.model_overrides(lt.LRTransferConfig(head_dim=8))["head_dim"] == 8
