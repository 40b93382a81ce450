"""Coordinate check over depth (`optlab mup coord-check --depths`): the residual stream's change is
flat in depth under depth-μP and CompleteP and grows without a depth rule; CompleteP also keeps each
branch's own update flat.

Thresholds from the measurement (llama-tiny at width 64, AdamW lr 1e-3, zero readout, 3 steps,
depths 2 → 16; `optlab mup coord-check --widths 64 --depths 2 4 8 16 --lr 1e-3`): the RMS of the
last block's output change since init at L=16 over L=2 was 5.3 without a rule, 1.13 (depth-μP)
and 1.04 (CompleteP); the MLP branches' change (mean over layers, before the multiplier) 0.46 /
0.50 / 0.87. The test runs depths 2 and 8 at width 32 and asks for the stream's ratio in (1/1.5,
1.5) under both rules and above 2.5 without one, and CompleteP's branch ratios above depth-μP's.
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_optlab.mup.cli import main
from lightning_optlab.mup.coord import coord_check, coord_points, depth_profile, depth_ratios


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    kw = dict(widths=[32], depths=[2, 8], steps=3, lr=1e-3, zero_readout=True)
    return {rule: coord_check("llama-tiny", "adamw", depth_rule=rule, **kw) for rule in ("none", "depth_mup", "completep")}


def test_the_stream_update_is_flat_in_depth_under_the_rules_and_grows_without(runs):
    ratios = {rule: depth_ratios(recs, 3) for rule, recs in runs.items()}
    assert ratios["none"]["stream"] > 2.5, ratios
    for rule in ("depth_mup", "completep"):
        assert 1 / 1.5 < ratios[rule]["stream"] < 1.5, (rule, ratios[rule])
        assert 1 / 1.5 < ratios[rule]["logits"] < 1.5, (rule, ratios[rule])
    # CompleteP (α = 1) keeps every branch learning: its per-layer updates shrink less than depth-μP's
    for kind in ("attn", "mlp"):
        assert ratios["completep"][kind] > ratios["depth_mup"][kind], (kind, ratios)
    assert 1 / 1.6 < ratios["completep"]["attn"] < 1.6, ratios["completep"]


def test_at_the_base_depth_every_rule_records_the_same_numbers(runs):
    base = {rule: [(r["module"], r["t"], r["rms"], r["delta_rms"]) for r in recs if r["depth"] == 2]
            for rule, recs in runs.items()}
    assert base["none"] == base["depth_mup"] == base["completep"]
    assert all(r["delta_rms"] == 0.0 for r in runs["none"] if r["t"] == 0)


def test_the_profile_follows_the_last_block_and_averages_the_branches(runs):
    recs = runs["completep"]
    prof = depth_profile(recs, 3, "rms")
    assert set(prof) == {"wte", "stream", "attn", "mlp", "logits"} and set(prof["stream"]) == {2, 8}
    last = [r["rms"] for r in recs if r["t"] == 3 and r["depth"] == 8 and r["module"] == "blocks.7"]
    assert prof["stream"][8] == pytest.approx(last[0])
    mlps = [r["rms"] for r in recs if r["t"] == 3 and r["depth"] == 8 and r["module"].endswith(".mlp")]
    assert len(mlps) == 8 and prof["mlp"][8] == pytest.approx(sum(mlps) / 8)


def test_points_pair_widths_and_depths_or_refuse():
    assert coord_points([32, 64], None) == [(32, None), (64, None)]
    assert coord_points([32], [2, 4]) == [(32, 2), (32, 4)]
    assert coord_points([32, 64], [4]) == [(32, 4), (64, 4)]
    assert coord_points([32, 64, 128], [2, 4, 8]) == [(32, 2), (64, 4), (128, 8)]
    with pytest.raises(ValueError, match="as many widths as depths"):
        coord_points([32, 64], [2, 4, 8])
    with pytest.raises(ValueError, match="needs depths"):
        coord_check("llama-tiny", "adamw", widths=[32, 64], depth_rule="completep", steps=1)


def test_cli_writes_the_depth_figure_and_ratios(tmp_path, capsys):
    out = tmp_path / "depth.png"
    assert main(["coord-check", "--widths", "32", "64", "--depths", "2", "4", "--steps", "2", "--lr", "1e-3",
                 "--depth-rules", "none", "completep", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "completep" in text and "stream" in text and out.stat().st_size > 10_000
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(doc["ratios"]) == {"none", "completep"} and doc["points"] == [[32, 2], [64, 4]]
    assert set(doc["ratios"]["completep"]["delta_rms"]) >= {"stream", "mlp", "attn"}
    assert main(["coord-check", "--widths", "32", "64", "--depths", "2", "4", "8", "--out", str(out)]) == 2
    assert "as many widths as depths" in capsys.readouterr().err
