"""`optlab mup transfer | coord-check | lr-find` (through lightning_optlab.mup.cli.main) and the LR range test."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lightning_optlab.configure import OptimizerSpec, build_optimizer
from lightning_optlab.models import build_model
from lightning_optlab.mup import build_mup_model, lr_range_test, transfer
from lightning_optlab.mup.cli import main

PROXY = {
    "seed_everything": 0,
    "model": {"model": {"preset": "llama-tiny", "n_embd": 32}, "mup": {"base": {"preset": "llama-tiny", "n_embd": 32}}},
    "optimizer": {"name": "adamw", "lr": 4e-3, "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 10, "mup": True},
    "trainer": {"max_steps": 100},
    "scales": {"tiny": {"model": {"model": {"preset": "llama-tiny"}}}},
}


def test_transfer_keeps_the_numbers_and_prints_the_per_role_rates(tmp_path, capsys):
    target = {"preset": "llama-tiny", "n_embd": 128, "n_layer": 4}
    result = transfer(PROXY, target)
    recipe = result["recipe"]
    assert recipe["optimizer"]["lr"] == 4e-3 and recipe["optimizer"]["mup"] is True
    assert recipe["model"]["model"] == target and recipe["model"]["mup"]["base"]["n_embd"] == 32
    assert "scales" not in recipe and recipe["trainer"] == PROXY["trainer"]
    lrs = {(role, round(lr, 10)) for _, role, lr, _, _ in result["role_lrs"]}
    assert ("hidden", 1e-3) in lrs and ("readout", 4e-3) in lrs and ("embedding", 4e-3) in lrs  # η/4 on 4x-wide matrices
    assert any("deeper than the proxy (2 → 4 layers)" in n and "--depth completep" in n for n in result["notes"])
    assert any("batch size" in n for n in result["notes"]) and result["depth"]["rule"] == "none"
    # 4 heads kept from width 32 to 128: the head size grows 8 → 32, and the transfer says what that costs
    assert any("head size changes from 8 to 32" in n and "2x smaller" in n for n in result["notes"])
    same_heads = transfer(PROXY, {**target, "n_head": 16})
    assert not any("head size" in n for n in same_heads["notes"])
    # the stored base shapes are what a model built from the written recipe recomputes
    rebuilt = build_mup_model(recipe["model"]["model"], base=recipe["model"]["mup"]["base"])
    assert result["base_shapes"] == {n: list(p.infshape.base_shape()) for n, p in rebuilt.named_parameters()}

    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(PROXY))
    out = tmp_path / "target.yaml"
    assert main(["transfer", str(tmp_path / "proxy.yaml"), "--target", "llama-tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "width multipliers by role" in text and "not transferred by μP" in text and "hidden" in text
    assert yaml.safe_load(out.read_text())["model"]["mup"]["base"]["n_embd"] == 32
    assert json.loads(out.with_suffix(".base_shapes.json").read_text())


def test_transfer_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="larger than the target"):
        transfer({**PROXY, "model": {"model": {"preset": "llama-tiny", "n_embd": 128}}}, {"preset": "llama-tiny"})
    with pytest.raises(ValueError, match="architectures differ"):
        transfer(PROXY, "gpt2-tiny")
    with pytest.raises(ValueError, match="no model and optimizer"):
        transfer({"trainer": {}}, "llama-tiny")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**PROXY, "optimizer": {"name": "shampoo", "hparams": {"grafting": "none"}}}))
    assert main(["transfer", str(tmp_path / "p.yaml"), "--target", "llama-tiny", "--out", str(tmp_path / "t.yaml")]) == 2
    assert "no μP rule" in capsys.readouterr().err


def test_coord_check_command_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "coord.png"
    assert main(["coord-check", "--widths", "32", "64", "--steps", "1", "--seq-len", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and "SP:" in capsys.readouterr().out
    assert set(json.loads(out.with_suffix(".json").read_text())["ratios"]) == {"μP", "SP"}


def test_lr_range_test_moves_all_groups_together():
    torch.manual_seed(0)
    model = build_mup_model({"preset": "llama-tiny", "n_layer": 1}, base=32, n_embd=128)
    opt = build_optimizer(model, OptimizerSpec(name="adamw", lr=2e-3, mup=True, overrides={"norm": {"lr": 1e-3}}))
    before = [g["lr"] / 2e-3 for g in opt.param_groups]
    assert sorted(set(round(r, 6) for r in before)) == [0.25, 0.333333, 0.5, 1.0]
    batches = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    res = lr_range_test(model, opt, batches, lambda m, b: m.loss(m(b[:, :-1]), b[:, 1:]), base_lr=2e-3,
                        min_lr=1e-4, max_lr=1e-1, num_steps=12)
    assert res.lrs[0] == pytest.approx(1e-4) and res.suggestion is not None
    for g, r in zip(opt.param_groups, before):  # every group at the last base LR times its own ratio
        assert g["lr"] == pytest.approx(res.lrs[-1] * r)
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        lr_range_test(model, opt, batches, lambda m, b: m.loss(m(b[:, :-1]), b[:, 1:]), base_lr=2e-3, min_lr=1, max_lr=0.1)


def test_lr_find_command(capsys):
    assert main(["lr-find", "--width", "64", "--base-width", "32", "--steps", "8", "--seq-len", "16", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "suggested base lr" in text and "lr ratios kept: 0.5" in text
    assert build_model("llama-tiny").config.n_embd == 64  # the preset is not changed by the command


def test_transfer_carries_the_proxys_tuned_init_and_output_multiplier():
    """docs/mup.md: tune init_std (and the output multiplier) on the proxy beside the learning rate; the target
    takes them from the proxy (a preset's own 0.02 would fail the architecture check), unless it names its own."""
    tuned = {"preset": "llama-tiny", "n_embd": 32, "init_std": 0.05, "logit_scale": 2.0}
    proxy = {**PROXY, "model": {"model": tuned, "mup": {"base": tuned}}}
    result = transfer(proxy, {"preset": "llama-tiny", "n_embd": 128, "n_head": 16})
    assert result["recipe"]["model"]["model"]["init_std"] == 0.05 and result["target"].init_std == 0.05
    assert result["target"].logit_scale == 2.0 and result["recipe"]["model"]["mup"]["base"]["init_std"] == 0.05
    assert any("taken from the proxy" in n and "init_std 0.05 (the target preset has 0.02)" in n for n in result["notes"])
    model = build_mup_model(result["recipe"]["model"]["model"], base=result["recipe"]["model"]["mup"]["base"])
    assert model.config.logit_scale == pytest.approx(2.0 * 32 / 128)  # the base's multiplier times μP's 1/m
    assert not any("taken from the proxy" in n for n in transfer(PROXY, "llama-tiny")["notes"])
    with pytest.raises(ValueError, match="init_std: proxy 0.05 vs target 0.02"):  # the target names its own
        transfer(proxy, {"preset": "llama-tiny", "n_embd": 128, "init_std": 0.02})


def test_the_proxy_recipes_grid_tunes_lr_and_init_std_and_the_transfer_carries_it():
    from pathlib import Path

    from lightning_optlab.sweep import SweepSpec, expand_points, point_config, resolve_recipe

    recipe = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "mup-proxy-llama-50m.yaml").read_text())
    config, sweep = resolve_recipe(recipe)
    spec = SweepSpec.from_dict(sweep)
    points = expand_points(spec)
    assert len(points) == 12 and {dict(p.values)["model.model.init_std"] for p in points} == {0.01, 0.02, 0.05, 0.1}
    point = next(p for p in points if dict(p.values) == {"lr": 3.16e-4, "model.model.init_std": 0.05})
    cfg = point_config(config, spec, point)
    assert cfg["optimizer"]["lr"] == 3.16e-4 and cfg["model"]["mup"]["base"] == 512
    with torch.device("meta"):  # the base width follows the point's init_std: the proxy is its own base
        model = build_mup_model(cfg["model"]["model"], base=cfg["model"]["mup"]["base"])
    assert model.config.init_std == 0.05 and model.config.logit_scale == 1.0
    result = transfer(cfg, "llama-2.7b")
    assert result["target"].init_std == 0.05 and "sweep" not in result["recipe"]
    assert result["recipe"]["optimizer"]["lr"] == 3.16e-4 and result["recipe"]["model"]["mup"]["base"]["init_std"] == 0.05
