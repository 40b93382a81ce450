"""The optimizer-step benchmark's peer table and its floors (the floor must do the work it claims)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load_optim_step():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("syrk", [False, True])
def test_floor_updates_the_factors_as_the_ema_of_the_grams(syrk):
    if syrk:
        pytest.importorskip("scipy")
    bench = _load_optim_step()
    g = torch.randn(24, 10, generator=torch.Generator().manual_seed(0))
    floor = bench.Floor("soap", [g], freq=2, beta=0.9, syrk=syrk)
    before = [f.clone() for f in floor.factors[0]]
    for _ in range(2):  # the second step refreshes (F Q and QR) too
        floor.step()
    expected = [0.81 * before[0] + 0.19 * g @ g.T, 0.81 * before[1] + 0.19 * g.T @ g]
    for got, want in zip(floor.factors[0], expected):
        part = torch.triu if syrk else (lambda x: x)  # ssyrk writes one triangle
        torch.testing.assert_close(part(got), part(want), rtol=1e-5, atol=1e-5)


def test_peer_table_prints_ratios_and_floors(capsys):
    pytest.importorskip("pytorch_optimizer")
    bench = _load_optim_step()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--peers-only", "--width", "16", "--layers", "1", "--vocab", "64",
                           "--rounds", "1", "--steps", "10"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "pytorch_optimizer.SOAP" in out and "pytorch_optimizer.Shampoo" in out
    floor_rows = out.split("floors (")[1].splitlines()[2:]
    assert any(r.startswith("soap") for r in floor_rows) and any(r.startswith("shampoo") for r in floor_rows)


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_dry_run_fills_every_section(tmp_path, capsys):
    """The accelerator suite's code path on the CPU at tiny sizes: every section yields rows with
    measured numbers, the baseline's ratio is 1, every speed option ran a short training run."""
    bench = _load("gpu_suite")
    threads = torch.get_num_threads()
    out_json = tmp_path / "suite.json"
    try:
        assert bench.main(["--dry-run", "--json", str(out_json)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    rows = json.loads(out_json.read_text())["rows"]
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    assert set(by_section) == {"step", "options", "mfu", "to_loss"}
    step = {r["name"]: r for r in by_section["step"]}
    from lightning_optlab.optim import available_optimizers

    assert set(available_optimizers()) <= set(step)  # every registered optimizer is timed
    assert step["adamw"]["ratio"] == pytest.approx(1.0)
    assert all(r["median_ms"] > 0 and r["amortized_ms"] > 0 for r in step.values())
    assert step["adamw"]["bytes_per_param"] == pytest.approx(8.0)  # two float32 moments
    assert any(n.startswith("adamw compiled") for n in step)
    assert len(by_section["options"]) == len(bench.OPTIONS)
    assert all(r["loss"] > 0 and r["median_ms"] > 0 for r in by_section["options"])
    assert len(by_section["mfu"]) == 4 and all(r["median_ms"] > 0 for r in by_section["mfu"])
    printed = capsys.readouterr().out
    assert "gpu_suite on cpu" in printed and "to_loss" in printed


def test_gpu_suite_budget_stops_new_rows(capsys):
    bench = _load("gpu_suite")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--dry-run", "--sections", "options", "--budget-s", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("not run: the 0 s budget was spent") == len(bench.OPTIONS)


def test_mup_quality_same_sp_gives_sp_the_model_side_changes(tmp_path):
    bench = _load("mup_quality")
    threads = torch.get_num_threads()
    out = tmp_path / "q.json"
    common = ["--widths", "16", "32", "--mup-log2-lrs", "-5", "-4", "--sp-log2-lrs", "-6", "--seeds", "0",
              "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--json", str(out)]
    try:
        assert bench.main(["--candidates", "default", "random_readout", "--same-sp", *common]) == 0
        import json

        same = json.loads(out.read_text())["table"]
        assert bench.main(["--candidates", "random_readout", *common]) == 0
        plain = json.loads(out.read_text())["table"]
    finally:
        torch.set_num_threads(threads)
    assert same["default"]["sp_reference"] == "SP" and same["random_readout"]["sp_reference"] == "SP random_readout"
    assert plain["random_readout"]["sp_reference"] == "SP"
    # the μP side is the same run; SP with a random readout is another model than SP with a zero one
    assert same["random_readout"]["wide"]["0"] == pytest.approx(plain["random_readout"]["wide"]["0"])
    assert same["random_readout"]["sp_wide"]["0"] != pytest.approx(plain["random_readout"]["sp_wide"]["0"])
    assert same["default"]["sp_wide"]["0"] == pytest.approx(plain["random_readout"]["sp_wide"]["0"])
    assert bench.parse_candidate("head_dim=8+init_std=0.1") == {"name": "head_dim=8+init_std=0.1", "head_dim": 8,
                                                                "init_std": 0.1}


def test_mup_quality_head_dim_grows_heads_at_a_fixed_head_size():
    bench = _load("mup_quality")
    import argparse

    args = argparse.Namespace(model="llama-tiny", widths=[16, 32], steps=2, batch_size=2, seq_len=16)
    seen = []
    orig = bench.train_run

    def spy(model, make, batches, steps):
        seen.append((model.config.n_embd, model.config.n_head, model.config.head_dim, model.config.softmax_scale))
        return orig(model, make, batches, steps)

    bench.train_run = spy
    try:
        for mup in (True, False):
            bench.train_point({"name": "h", "head_dim": 4, "sp_too": True}, mup=mup, width=32, log2_lr=-5, seed=0, args=args)
    finally:
        bench.train_run = orig
    (w, heads, hd, mu_scale), (_, sp_heads, _, sp_scale) = seen
    assert (w, heads, hd, sp_heads) == (32, 8, 4, 8)
    assert mu_scale == pytest.approx(sp_scale) == pytest.approx(4 ** -0.5)  # same head size: μP's 1/d is SP's


def test_mup_quality_probe_runs_each_candidate_against_sp_at_its_length(tmp_path, capsys):
    bench = _load("mup_quality")
    threads = torch.get_num_threads()
    out = tmp_path / "q.json"
    try:
        assert bench.main(["--candidates", "default", "attn_sqrt", "init_std=0.1", "vector_lr=0.25", "steps=3",
                           "output_mult=4", "random_readout", "eps=1e-12", "attn_sqrt+init_std=0.1",
                           "--widths", "16", "32", "--mup-log2-lrs", "-5", "-4", "--sp-log2-lrs", "-6",
                           "--seeds", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    table = json.loads(out.read_text())["table"]
    assert set(table) == {"default", "attn_sqrt", "init_std=0.1", "vector_lr=0.25", "steps=3", "output_mult=4",
                          "random_readout", "eps=1e-12", "attn_sqrt+init_std=0.1"}
    d = table["default"]
    assert d["mup_minus_sp"]["0"] == pytest.approx(d["wide"]["0"] - d["sp_wide"]["0"])
    # the base width is where μP equals SP: the attention-scale candidate changes nothing there
    assert table["attn_sqrt"]["base"]["0"] == pytest.approx(d["base"]["0"])
    assert table["attn_sqrt"]["wide"]["0"] != pytest.approx(d["wide"]["0"])
    assert table["steps=3"]["sp_wide"]["0"] != pytest.approx(d["sp_wide"]["0"])  # SP rerun at that length
    # at the base width μP is SP: a changed output multiplier or readout init shows there already
    assert table["output_mult=4"]["base"]["0"] != pytest.approx(d["base"]["0"])
    assert table["random_readout"]["base"]["0"] != pytest.approx(d["base"]["0"])
    assert bench.parse_candidate("attn_sqrt+init_std=0.1") == {"name": "attn_sqrt+init_std=0.1", "attn_sqrt": True,
                                                               "init_std": 0.1}
    with pytest.raises(ValueError, match="unknown candidate"):
        bench.parse_candidate("init=0.1")
    with pytest.raises(ValueError, match="not a number"):
        bench.parse_candidate("eps=tiny")


def test_distributed_step_benchmark_measures_both_modes_and_the_state_per_rank(tmp_path, capsys):
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "distributed_step.py"), "--width", "16", "--blocks",
                          "2", "--steps", "2", "--rounds", "1", "--json", str(tmp_path / "d.json")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    out, rows = res.stdout, json.loads((tmp_path / "d.json").read_text())
    assert "| soap |" in out and "owner / replicate" in out and "FSDP2 / DDP replicate" in out
    assert set(rows["time"]) == {"soap", "shampoo", "muon"}
    for name, r in rows["bytes"].items():
        # two blocks of equal matrices: an owner (or FSDP2 shard) holds half of the state
        assert r["fsdp"] == pytest.approx(r["ddp_replicate"] / 2, rel=0.05), name
        if name in rows["time"] or name == "adafactor":
            assert r["ddp_owner"] == pytest.approx(r["ddp_replicate"] / 2, rel=0.05), name
        else:  # diagonal optimizers work on local tensors: DDP keeps everything everywhere
            assert r["ddp_owner"] == r["ddp_replicate"], name
