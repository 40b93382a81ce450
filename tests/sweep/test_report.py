"""The report from a small synthetic results table, checked cell by cell against hand computations."""

import json
import math

import pytest

from lightning_optlab.sweep import build_report, stability_range, write_csv
from lightning_optlab.sweep.report import race

# Two optimizers over three learning rates and two seeds; lion's largest LR diverged in one seed.
# Seed means (hand computed):
#   adamw: lr 1e-3 -> (3.30+3.20)/2 = 3.25, 3e-3 -> (3.00+3.10)/2 = 3.05, 1e-2 -> (3.12+3.16)/2 = 3.14
#   lion:  lr 1e-4 -> 3.40, 3e-4 -> 3.20 (best), 1e-3 -> diverged in seed 1 (inf)
_ROWS = [
    ("adamw", "adamw", 1e-3, 0, "done", 3.30), ("adamw", "adamw", 1e-3, 1, "done", 3.20),
    ("adamw", "adamw", 3e-3, 0, "done", 3.00), ("adamw", "adamw", 3e-3, 1, "done", 3.10),
    ("adamw", "adamw", 1e-2, 0, "done", 3.12), ("adamw", "adamw", 1e-2, 1, "done", 3.16),
    ("lion", "lion", 1e-4, 0, "done", 3.40), ("lion", "lion", 1e-4, 1, "done", 3.40),
    ("lion", "lion", 3e-4, 0, "done", 3.15), ("lion", "lion", 3e-4, 1, "done", 3.25),
    ("lion", "lion", 1e-3, 0, "done", 3.22), ("lion", "lion", 1e-3, 1, "diverged", math.nan),
]


def _table(tmp_path, with_eval=True, extra=()):
    rows = []
    for label, opt, lr, seed, status, loss in list(_ROWS) + list(extra):
        row = {"point": f"{label}__lr={lr:.4g}__seed={seed}", "label": label, "optimizer": opt, "seed": seed, "lr": lr,
               "status": status, "final_train_loss": loss + 0.05, "final_val_loss": loss, "steps": 100,
               "tokens": 100 * 512}
        if with_eval and status == "done":
            row["eval/arc_easy/acc"] = 0.25 + (0.1 if label == "adamw" else 0.0) + 0.01 * seed
        rows.append(row)
    write_csv(tmp_path / "results.csv", rows)
    return rows


def test_stability_range_is_the_contiguous_run_around_the_best():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    # 3e-4 is within tolerance but cut off from the best by 1e-3, so it does not count
    assert stability_range(lrs, [5.0, 3.05, 3.5, 3.0, 3.08], 0.1) == (3e-3, 1e-2)
    assert stability_range(lrs[::-1], [3.08, 3.0, 3.5, 3.05, 5.0], 0.1) == (3e-3, 1e-2)  # order does not matter
    assert stability_range(lrs, [math.inf, 3.0, math.inf, 3.01, 3.0], 0.5) == (3e-4, 3e-4)
    assert stability_range(lrs, [math.inf] * 5, 0.1) is None


def test_report_table_cell_by_cell(tmp_path):
    _table(tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps({"tolerance": 0.1, "metric": "final_val_loss"}))
    report = build_report(tmp_path)
    by_label = {s["label"]: s for s in report["summaries"]}
    a, lion = by_label["adamw"], by_label["lion"]
    assert a["best_loss"] == pytest.approx(3.05) and a["best"] == {"lr": 3e-3}
    # within 0.1 of 3.05: 3e-3 (3.05) and 1e-2 (3.14); 1e-3 (3.25) is not
    assert a["range"] == (3e-3, 1e-2) and a["width_decades"] == pytest.approx(math.log10(1e-2 / 3e-3))
    assert a["points"] == 6 and a["diverged"] == 0
    assert a["evals"]["eval/arc_easy/acc"] == pytest.approx(0.355)  # mean of 0.35 and 0.36 at the best LR
    assert lion["best_loss"] == pytest.approx(3.20) and lion["best"] == {"lr": 3e-4}
    assert lion["range"] == (3e-4, 3e-4) and lion["width_decades"] == 0.0  # 1e-3 diverged in a seed: outside
    assert lion["diverged"] == 1

    lines = report["table"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "optimizer", "best final_val_loss", "at", "bracketed", "loss one value below / above",
                      "lr range within 0.1 of best", "width (decades)", "points (diverged)", "eval/arc_easy/acc"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # seed spread at the best point: std of (3.00, 3.10) and of (3.15, 3.25) = 0.1 / sqrt(2); one value away:
    # adamw 3.25 - 3.05 below, 3.14 - 3.05 above; lion 3.40 - 3.20 below, diverged above
    assert cells[0] == ["adamw", "adamw", "3.0500 ± 0.0707 (2 seeds)", "lr=0.003", "yes", "+0.200 / +0.090",
                        "[0.003, 0.01]", "0.52", "6 (0)", "0.3550"]
    assert cells[1] == ["lion", "lion", "3.2000 ± 0.0707 (2 seeds)", "lr=0.0003", "yes", "+0.200 / diverged",
                        "[0.0003, 0.0003]", "0.00", "6 (1)", "0.2550"]
    assert a["bracketed"] == "yes" and a["seed_std"] == pytest.approx(0.1 / math.sqrt(2))
    md = (tmp_path / "report.md").read_text()
    assert report["table"] in md and "within 0.1 nats" in md
    png = tmp_path / "loss_vs_lr.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_tolerance_and_metric_options_and_no_eval(tmp_path):
    _table(tmp_path, with_eval=False)
    report = build_report(tmp_path, tolerance=0.25, metric="final_train_loss")
    a = next(s for s in report["summaries"] if s["label"] == "adamw")
    assert a["best_loss"] == pytest.approx(3.10) and a["range"] == (1e-3, 1e-2)  # 3.30 ≤ 3.10 + 0.25
    assert "eval/" not in report["table"]


def test_a_label_with_only_diverged_points_ranks_last(tmp_path):
    extra = [("sgd", "sgd", 1.0, 0, "diverged", math.nan), ("sgd", "sgd", 3.0, 0, "diverged", math.nan)]
    _table(tmp_path, extra=extra)
    report = build_report(tmp_path)
    last = report["table"].splitlines()[-1]
    assert last.startswith("| sgd | sgd | diverged | - | - | - / - | - | - | 2 (2) |")


def test_race_to_the_reference_loss():
    curves = {"adamw": [(1, 1.0, 5.0), (2, 2.0, 4.0), (4, 4.0, 3.0)],
              "soap": [(1, 2.0, 4.5), (2, 4.0, 3.0), (4, 8.0, 2.5)],
              "sgd": [(1, 1.0, 6.0), (4, 4.0, 3.5)]}
    r = race(curves, "adamw")
    assert r["adamw"]["step"] == 4 and r["adamw"]["step_ratio"] == 1.0
    assert r["soap"]["step"] == 2 and r["soap"]["step_ratio"] == 0.5 and r["soap"]["seconds_ratio"] == 1.0
    assert r["sgd"]["step"] is None


def test_momentum_axis_range_without_decades_and_its_plot(tmp_path):
    rows = []
    for label, losses in (("sgd", [3.9, 3.5, 3.42, 3.6]), ("adamw", [3.2, 3.1, 3.15, 3.3])):
        for m, loss in zip([0.8, 0.9, 0.95, 0.98], losses):
            rows.append({"point": f"{label}__momentum={m}__seed=0", "label": label, "optimizer": label, "seed": 0,
                         "momentum": m, "status": "done", "final_val_loss": loss})
    write_csv(tmp_path / "results.csv", rows)
    report = build_report(tmp_path)
    by_label = {s["label"]: s for s in report["summaries"]}
    assert by_label["adamw"]["best"] == {"momentum": 0.9} and by_label["adamw"]["range"] == (0.8, 0.95)
    assert by_label["sgd"]["range"] == (0.9, 0.95) and by_label["sgd"]["width_decades"] is None
    assert "| sgd | sgd | 3.4200 | momentum=0.95 | yes | +0.080 / +0.180 | [0.9, 0.95] | - | 4 (0) |" in report["table"]
    assert by_label["adamw"]["bracketed"] == "yes" and by_label["adamw"]["seed_std"] is None  # one seed
    assert (tmp_path / "loss_vs_momentum.png").stat().st_size > 5000


def test_an_optimum_at_the_grid_edge_is_flagged(tmp_path):
    rows = [{"point": f"a__lr={lr}__seed=0", "label": "a", "optimizer": "adamw", "seed": 0, "lr": lr, "status": "done",
             "final_val_loss": loss} for lr, loss in ((1e-3, 3.0), (3e-3, 3.2), (1e-2, 3.5))]
    write_csv(tmp_path / "results.csv", rows)
    (s,) = build_report(tmp_path)["summaries"]
    assert s["bracketed"] == "low" and s["steps_away"] == [None, pytest.approx(0.2)]
    assert "| no: lowest value | - / +0.200 |" in build_report(tmp_path)["table"]


def test_race_on_validations_places_the_crossing_between_them():
    curves = {"adamw": [(100, 10.0, 4.0), (200, 20.0, 3.5), (300, 30.0, 3.2)],
              "soap": [(100, 20.0, 3.8), (200, 40.0, 3.0), (300, 60.0, 2.9)]}
    r = race(curves, "adamw", interpolate=True)
    # soap crosses 3.2 a quarter of the way from 3.8 (step 100) to 3.0 (step 200): (3.8 - 3.2) / (3.8 - 3.0) = 0.75
    assert r["soap"]["step"] == pytest.approx(175) and r["soap"]["seconds"] == pytest.approx(35.0)
    assert r["soap"]["step_ratio"] == pytest.approx(175 / 300) and r["soap"]["seconds_ratio"] == pytest.approx(35 / 30)
    assert r["adamw"]["step"] == 300  # its own end: reached exactly there
    assert race(curves, "adamw")["soap"]["step"] == 200  # without interpolation: the first validation below
    # a reference whose held-out loss was lower before its end (it rose again): ratios to its own first crossing
    curves["adamw"] = [(100, 10.0, 4.0), (200, 20.0, 3.0), (300, 30.0, 3.2)]
    r = race(curves, "adamw", interpolate=True)
    assert r["adamw"]["step"] == pytest.approx(180) and r["adamw"]["step_ratio"] == pytest.approx(1.0)
    assert r["soap"]["step_ratio"] == pytest.approx(175 / 180) and r["soap"]["seconds_ratio"] == pytest.approx(35 / 18)


def test_the_report_races_on_the_held_out_curve_when_every_run_was_validated(tmp_path):
    """On a corpus read in a fixed order the training loss dips below the reference's final value on an easy
    stretch; the race on validations is not fooled by it."""
    write_csv(tmp_path / "results.csv", [
        {"point": "adamw__lr=0.001__seed=0", "label": "adamw", "optimizer": "adamw", "seed": 0, "lr": 1e-3,
         "status": "done", "final_val_loss": 3.2, "steps": 4},
        {"point": "soap__lr=0.001__seed=0", "label": "soap", "optimizer": "soap", "seed": 0, "lr": 1e-3,
         "status": "done", "final_val_loss": 3.1, "steps": 4}])
    (tmp_path / "sweep.json").write_text(json.dumps({"reference": "adamw", "tolerance": 0.1}))
    curves = {"adamw": [(1, 1.0, 4.0, ""), (2, 2.0, 3.6, 3.8), (3, 3.0, 3.4, ""), (4, 4.0, 3.3, 3.2)],
              "soap": [(1, 2.0, 3.0, ""), (2, 4.0, 3.0, 3.6), (3, 6.0, 3.1, ""), (4, 8.0, 3.0, 3.1)]}
    for label, rows in curves.items():
        d = tmp_path / f"{label}__lr=0.001__seed=0"
        d.mkdir()
        (d / "curve.csv").write_text("step,train_seconds,train_loss,val_loss\n"
                                     + "".join(f"{s},{t},{a},{v}\n" for s, t, a, v in rows))
    report = build_report(tmp_path)
    assert report["race_held_out"] is True
    # validation: soap 3.6 at step 2, 3.1 at step 4 -> crosses 3.2 at 2 + 2 * 0.4 / 0.5 = 3.6 steps, 7.2 s
    assert report["race"]["soap"]["step"] == pytest.approx(3.6) and report["race"]["soap"]["seconds"] == pytest.approx(7.2)
    assert "final validation loss (interpolated between validations), 3.2000" in report["table"]
    assert json.loads((tmp_path / "report.json").read_text())["race_held_out"] is True
