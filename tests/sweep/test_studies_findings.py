"""scripts/studies_findings.py: the findings table's verdicts, on hand-made sweep tables."""

import importlib.util
import json
from pathlib import Path

import pytest

from lightning_optlab.sweep import write_csv

SCRIPT = Path(__file__).parents[2] / "scripts" / "studies_findings.py"


@pytest.fixture(scope="module")
def sf():
    spec = importlib.util.spec_from_file_location("studies_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep(runs: Path, recipe: str, points: list[tuple], axis: str = "lr", tolerance: float = 0.1) -> None:
    """points: (label, axis value, seed, final val loss[, train seconds per step])."""
    rows = []
    for label, value, seed, loss, *sps in points:
        rows.append({"point": f"{label}__{axis.split('.')[-1]}={value}__seed={seed}", "label": label,
                     "optimizer": label.split("_")[0].split("-")[0], "seed": seed, axis: value, "status": "done",
                     "final_train_loss": loss, "final_val_loss": loss, "steps": 100, "tokens": 100,
                     "train_seconds": 100 * sps[0] if sps else 10.0, "optimizer_share": 0.1})
    folder = runs / f"{recipe}-small"
    folder.mkdir(parents=True)
    write_csv(folder / "results.csv", rows)
    (folder / "sweep.json").write_text(json.dumps({"tolerance": tolerance}))


def _v(label: str, lrs: list[float], losses: list[float], sps: float = 0.1, seed: int = 0) -> list[tuple]:
    return [(label, lr, seed, loss, sps) for lr, loss in zip(lrs, losses)]


LRS = [1e-3, 1.78e-3, 3.16e-3]


def test_r1_r2_r6_from_the_lr_sweep_and_adam_vs_signum(tmp_path, sf):
    pts = (_v("adamw", LRS, [3.1, 3.0, 3.2], 0.13) + _v("adafactor", LRS, [3.1, 3.05, 3.3], 0.14)
           + _v("lion", LRS, [3.2, 3.04, 3.3], 0.11) + _v("signum", LRS, [3.3, 3.06, 3.1], 0.12)
           + _v("sophia", LRS, [3.2, 2.98, 3.0], 0.15) + _v("sgd", [1e-2, 1.78e-2, 3.16e-2], [3.9, 3.6, 3.7]))
    _sweep(tmp_path, "lr_sweep", pts)
    _sweep(tmp_path, "adam_vs_signum", _v("adam_b1=b2=0.95", LRS, [3.2, 3.02, 3.1])
           + _v("signum_b=0.95", LRS, [3.2, 3.05, 3.1]))
    result, _ = sf.findings(tmp_path)
    r1 = result["R1"]
    assert r1["verdict"] == "holds" and r1["adaptive_spread"] == pytest.approx(0.08)  # 3.06 - 2.98
    assert r1["sgd_gap_to_worst_adaptive"] == pytest.approx(0.54)
    r2 = result["R2"]  # Signum - Adam: +0.03 at beta1 = beta2, +0.06 at (0.9, 0.95)
    assert r2["verdict"] == "holds" and r2["signum_minus_adam_at_b1_eq_b2"] == pytest.approx(0.03)
    assert r2["signum_minus_adam_at_0.9_0.95"] == pytest.approx(0.06)
    r6 = result["R6"]  # Lion has the cheapest step, Sophia the lowest loss
    assert r6["verdict"] == "holds" and r6["seconds_per_step"]["lion"] == pytest.approx(0.11)
    assert r6["optimizer_ms_per_step"] == pytest.approx({"adamw": 13.0, "lion": 11.0, "sophia": 15.0})
    for key in ("R3", "R4", "R4b", "R5"):
        assert result[key]["verdict"] == "cannot tell"


def test_an_unbracketed_optimum_is_cannot_tell_and_a_wide_spread_does_not_hold(tmp_path, sf):
    base = (_v("adafactor", LRS, [3.1, 3.05, 3.3]) + _v("lion", LRS, [3.2, 3.04, 3.3])
            + _v("signum", LRS, [3.3, 3.06, 3.1]) + _v("sophia", LRS, [3.2, 2.98, 3.0])
            + _v("sgd", [1e-2, 1.78e-2, 3.16e-2], [3.9, 3.6, 3.7]))
    _sweep(tmp_path / "a", "lr_sweep", base + _v("adamw", LRS, [2.9, 3.0, 3.2]))  # best at the lowest rate
    assert sf.findings(tmp_path / "a")[0]["R1"]["verdict"] == "cannot tell"
    _sweep(tmp_path / "b", "lr_sweep", base + _v("adamw", LRS, [3.5, 3.4, 3.6]))  # 0.42 behind Sophia
    assert sf.findings(tmp_path / "b")[0]["R1"]["verdict"] == "does not hold"


def test_r3_r4_r4b(tmp_path, sf):
    sgd_lrs = [1.78e-2, 3.16e-2, 5.62e-2]
    # AdamW and SGD from the learning-rate sweep
    _sweep(tmp_path, "lr_sweep", _v("adamw", LRS, [3.1, 3.0, 3.2]) + _v("sgd", sgd_lrs, [3.7, 3.6, 3.65]))
    _sweep(tmp_path, "adalayer_ablations", _v("adalayer", LRS, [3.2, 3.05, 3.1]) + [("adalayer_frozen", 3.16e-3, 0, 3.1)]
           + _v("sgd+adalayer(readout)", sgd_lrs, [3.5, 3.4, 3.45])
           + _v("sgd+adalayer(readout+norm)", sgd_lrs, [3.2, 3.08, 3.15]))
    _sweep(tmp_path, "soap_precondition_frequency", [("soap", 100, 0, 3.05), ("shampoo", 100, 0, 3.3)],
           axis="optimizer.hparams.precondition_frequency")
    # f = 10: the SOAP study's points at the frequency study's rates (soap 1e-2, shampoo 3.16e-2)
    _sweep(tmp_path, "soap_vs_adamw_shampoo", [("soap", 0.01, 0, 3.0), ("soap", 0.0178, 0, 3.2),
                                                ("shampoo", 0.0316, 0, 3.1), ("shampoo", 0.0562, 0, 2.9)])
    result, _ = sf.findings(tmp_path)
    r3 = result["R3"]
    assert r3["verdict"] == "holds" and r3["gap_to_adamw"]["sgd+adalayer(readout)"] == pytest.approx(0.4)
    r4b = result["R4b"]
    assert r4b["verdict"] == "holds" and r4b["degradation"] == pytest.approx({"soap": 0.05, "shampoo": 0.2})
    assert result["R4b"]["losses"]["shampoo"] == {10: 3.1, 100: 3.3}  # not the better 5.62e-2 point: f alone differs


def test_the_script_writes_tables_figures_and_findings(tmp_path, sf, monkeypatch):
    _sweep(tmp_path / "runs", "lr_sweep", _v("adamw", LRS, [3.1, 3.0, 3.2]))
    monkeypatch.setattr("sys.argv", ["x", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    sf.main()
    out = tmp_path / "out"
    assert (out / "lr_sweep.csv").exists() and (out / "lr_sweep_loss_vs_lr.png").stat().st_size > 5000
    assert "| R1: all but SGD comparable" in (out / "findings.md").read_text()
    assert json.loads((out / "findings.json").read_text())["progress"]["lr_sweep"] == [3, 3]


def test_r4_reads_the_race_to_adamws_final_loss(sf):
    def summary(label, loss):
        return {"label": label, "best_loss": loss, "best": {"lr": 1e-2}, "bracketed": "yes", "seed_std": None,
                "seeds": 1, "width_decades": 0.25, "steps_away": [0.1, 0.1]}

    study = {"summaries": {k: summary(k, v) for k, v in (("adamw", 3.1), ("soap", 3.0), ("shampoo", 3.05))},
             "race": {"adamw": {"step_ratio": 1.0, "seconds_ratio": 1.0},
                      "soap": {"step_ratio": 0.7, "seconds_ratio": 0.8},
                      "shampoo": {"step_ratio": 0.8, "seconds_ratio": 1.1}}}
    r4 = sf._r4(study)
    assert r4["verdict"] == "holds" and all(r4["parts"].values())
    study["race"]["soap"]["seconds_ratio"] = 1.2  # fewer steps, but slower in wall-clock
    r4 = sf._r4(study)
    assert r4["verdict"] == "partly" and r4["parts"] == {
        "SOAP reaches AdamW's final loss in fewer steps": True, "and in less wall-clock": False,
        "SOAP ends below Shampoo": True, "fewer steps than Shampoo": True}
    assert "SOAP 0.70x its steps, 1.20x its wall-clock; Shampoo 0.80x, 1.10x" in r4["why"]


def test_r1m_momentum_wide_for_adaptive_and_high_for_sgd(tmp_path, sf):
    b1 = [0.0, 0.5, 0.9, 0.98]
    pts = [(label, m, 0, loss) for label, losses in (("adamw", [3.3, 3.05, 3.0, 3.02]), ("adafactor", [3.2, 3.08, 3.0, 3.1]),
                                                     ("lion", [3.15, 3.1, 3.05, 3.1]), ("signum", [3.4, 3.09, 3.05, 3.0]))
           for m, loss in zip(b1, losses)]
    sgd = [("sgd", m, 0, loss) for m, loss in zip([0.8, 0.9, 0.95, 0.98], [3.9, 3.7, 3.55, 3.5])]
    _sweep(tmp_path / "a", "momentum_sweep", pts + sgd, axis="momentum")
    r = sf.findings(tmp_path / "a")[0]["R1m"]
    assert r["verdict"] == "holds" and r["ranges"]["adamw"] == (0.5, 0.98) and r["wide"]["signum"]
    assert r["losses"]["sgd"][0.8] == 3.9
    # Signum 0.15 worse at 0.5 than at its best: not wide; SGD fine at 0.8: no need for high momentum
    pts = [p if not (p[0] == "signum" and p[1] == 0.5) else ("signum", 0.5, 0, 3.15) for p in pts]
    sgd = [("sgd", m, 0, loss) for m, loss in zip([0.8, 0.9, 0.95, 0.98], [3.55, 3.5, 3.52, 3.6])]
    _sweep(tmp_path / "b", "momentum_sweep", pts + sgd, axis="momentum")
    r = sf.findings(tmp_path / "b")[0]["R1m"]
    assert r["verdict"] == "does not hold" and not r["wide"]["signum"] and "narrow: signum" in r["why"]


def _budget(runs, gpt2, llama, sps=None):
    """gpt2 / llama: {optimizer: losses on its grid}; grids AdamW 3.16e-3.., Lion and Sophia 5.62e-4.."""
    grids = {"adamw": [3.16e-3, 5.62e-3, 1e-2], "lion": [5.62e-4, 1e-3, 1.78e-3], "sophia": [5.62e-4, 1e-3, 1.78e-3]}
    sps = sps or {"adamw": 0.2, "lion": 0.18, "sophia": 0.22}
    pts = [p for fam, table in (("gpt2", gpt2), ("llama", llama)) for o, losses in table.items()
           for p in _v(f"{o}-{fam}", grids[o], losses, sps[o])]
    _sweep(runs, "adamw_lion_sophia_budget", pts)


def test_r6_from_the_budget_study(tmp_path, sf):
    _budget(tmp_path / "a", gpt2={"adamw": [3.1, 3.0, 3.2], "lion": [3.2, 3.1, 3.3], "sophia": [3.0, 2.9, 3.1]},
            llama={"adamw": [3.2, 3.1, 3.05], "lion": [3.0, 2.95, 3.0], "sophia": [3.0, 2.9, 3.0]})
    r6 = sf.findings(tmp_path / "a")[0]["R6"]
    # adamw-llama is best at its top rate: the loss comparisons cannot be told; Lion's step is the cheapest
    assert r6["verdict"] == "partly" and r6["parts"]["Lion fastest (optimizer step)"] is True
    assert r6["parts"]["Sophia lowest loss in both families"] is None
    assert r6["optimizer_ms_per_step"] == pytest.approx({"adamw": 20.0, "lion": 18.0, "sophia": 22.0})
    _budget(tmp_path / "b", gpt2={"adamw": [3.1, 3.0, 3.2], "lion": [3.2, 3.1, 3.3], "sophia": [3.0, 2.9, 3.1]},
            llama={"adamw": [3.2, 3.1, 3.15], "lion": [3.0, 2.95, 2.98], "sophia": [3.0, 2.9, 3.0]})
    r6 = sf.findings(tmp_path / "b")[0]["R6"]
    assert r6["verdict"] == "partly" and r6["rank"] == {"gpt2": ["sophia", "adamw", "lion"],
                                                         "llama": ["sophia", "lion", "adamw"]}
    assert r6["parts"] == {"Lion fastest (optimizer step)": True, "Sophia lowest loss in both families": True,
                           "Lion ranks higher on LLaMA than on GPT-2": True,
                           "LLaMA's best rate above GPT-2's (median over the three)": False}
    assert r6["llama_over_gpt2_lr"] == pytest.approx({"adamw": 1.0, "lion": 1.0, "sophia": 1.0})
    assert "Downstream: cannot tell" in r6["why"]


def test_r5_reads_the_transfer_verdicts_and_cannot_tell_without_a_run(tmp_path, sf):
    def combined(verdicts):
        return json.dumps({"seeds": [0, 1], "verdict": {o: {"transfers": ok, "mup_shift": m, "sp_shift": s}
                                                        for o, (ok, m, s) in verdicts.items()}})
    (tmp_path / "a.json").write_text(combined({"adamw": (True, 0.3, 3.6), "lion": (True, 0.2, 2.8)}))
    (tmp_path / "s.json").write_text(combined({"sophia": (False, 1.4, 2.0)}))
    r5 = sf._r5({"adamw": "a.json", "lion": "a.json", "sophia": "s.json"}, tmp_path)
    assert r5["verdict"] == "partly" and r5["parts"]["sophia: μP's optimum transfers across width"] is False
    assert "adamw μP 0.30 vs SP 3.60 grid steps over 2 seeds" in r5["why"]
    r5 = sf._r5({"adamw": "a.json", "sophia": "missing.json"}, tmp_path)
    assert r5["verdict"] == "partly" and r5["per_optimizer"]["sophia"] is None  # adamw yes, sophia cannot tell
    assert sf._r5({"sophia": "missing.json"}, tmp_path)["verdict"] == "cannot tell"


def test_the_table_states_the_seed_spread_of_the_points_that_ran_several_seeds(tmp_path, sf):
    points = _v("adamw", LRS, [3.1, 3.0, 3.2]) + [("adamw", 1.78e-3, 1, 3.02, 0.1), ("adamw", 1.78e-3, 2, 2.98, 0.1)]
    points += _v("lion", LRS, [3.3, 3.1, 3.2])
    _sweep(tmp_path, "lr_sweep", points)
    result, _ = sf.findings(tmp_path)
    (entry,) = result["seeded_points"]["lr_sweep"]
    assert entry["label"] == "adamw" and entry["loss"] == pytest.approx(3.0)
    assert entry["seed_std"] == pytest.approx(0.02, rel=0.3)  # sample or population std of 3.0, 3.02, 2.98
    md = sf.to_markdown(result)
    assert "- lr_sweep: adamw 3.000 ± 0.0" in md and "(3 seeds at lr 0.00178)" in md
    assert "lion" not in md.split("Seed spread")[1]  # one seed: no spread claimed


def test_r5d_reads_the_depth_transfer_per_optimizer_and_rule(tmp_path, sf):
    def entry(fits, outside=()):
        return {"sizes": [2, 16], "fitted_best_log2_lr": fits, "fitted_outside_grid": list(outside)}

    summary = {"adamw/none": entry({"2": -5.0, "16": -5.5}), "adamw/completep": entry({"2": -5.0, "16": -15.0}, [16]),
               "lion/none": entry({"2": -7.0, "16": -8.5}), "lion/completep": entry({"2": -7.0, "16": -7.2}),
               "sophia/none": entry({"2": -6.0, "16": -6.3}), "sophia/completep": entry({"2": -6.0, "16": -6.1})}
    verdict = {k: {"shift_steps": abs(v["fitted_best_log2_lr"]["16"] - v["fitted_best_log2_lr"]["2"]),
                   "holds": abs(v["fitted_best_log2_lr"]["16"] - v["fitted_best_log2_lr"]["2"]) <= 1.0}
               for k, v in summary.items()}
    gaps = {k: {"gap_nats": 0.1} for k in summary}
    path = tmp_path / "depth.json"
    path.write_text(json.dumps({"summary": summary, "verdict": verdict, "joint_gaps": gaps, "seeds": [0, 1]}))
    r = sf._r5d(path.name, tmp_path)
    assert r["parts"] == {"adamw/none transfers across depth": True,
                          "adamw/completep transfers across depth": None,  # the fit left the grid: no vertex to read
                          "lion/none transfers across depth": False,  # 1.5 grid steps
                          "lion/completep transfers across depth": True,
                          "sophia/none transfers across depth": True, "sophia/completep transfers across depth": True}
    assert r["verdict"] == "partly" and "adamw/completep fit outside the grid" in r["why"]
    assert sf._r5d("missing.json", tmp_path)["verdict"] == "cannot tell"
