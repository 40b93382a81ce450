import json

import pytest

from lightning_optlab.cli import main
from lightning_optlab.demo import DemoConfig, embedded_corpus


def test_embedded_corpus_is_natural_language_text():
    docs = embedded_corpus()
    text = " ".join(t for _, t in docs)
    assert len(docs) > 50 and len(text) > 200_000
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.05


def test_demo_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "8", "--optimizers", "adamw,sgd+adalayer(readout+norm)", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "sgd+adalayer(readout+norm)" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    results = json.loads((out / "report.json").read_text())
    assert len(results["adamw"]["train_loss"]) == 8
    assert results["adamw"]["final_val_loss"] < 5.6  # below the uniform-bytes loss ln(256) = 5.55


def test_demo_rejects_unknown_runs_before_training(capsys):
    assert main(["demo", "--optimizers", "adamq"]) == 2
    assert "unknown demo run(s) ['adamq']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be ≥ 1"):
        DemoConfig(steps=0)


def test_optimizers_subcommand_lists_the_registry(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert "adalayer" in out and "sophia  (aliases:" in out
