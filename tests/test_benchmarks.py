"""The optimizer-step benchmark's peer table and its floors (the floor must do the work it claims)."""

from __future__ import annotations

import importlib.util
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
