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
    assert main(["demo", "--steps", "8", "--seq-len", "32", "--batch-size", "4", "--optimizers",
                 "adamw,sgd+adalayer(readout+norm)", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "sgd+adalayer(readout+norm)" in report and "optimizer share" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert list((out / "slimpajama_format" / "train" / "chunk1").glob("*.jsonl.zst"))
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    results = json.loads((out / "report.json").read_text())
    r = results["adamw"]
    assert r["steps"] == 8 and r["tokens"] == 8 * 4 * 32
    assert [step for step, _, _ in r["val_curve"]] == [2, 4, 6, 8]
    assert 0 < r["optimizer_share"] < 1 and r["tokens_per_sec"] > 0
    assert r["final_val_loss"] < 6.94  # below the uniform loss over the 1024-token vocabulary, ln(1024)
    # the pack's callbacks ran: health figures per run, and their statistics in TensorBoard
    for label in ("adamw", "sgd+adalayer(readout+norm)"):
        assert (out / results[label]["health_plot"].split(str(out) + "/")[-1]).stat().st_size > 1000
    assert "Effective learning rates per layer" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "adamw")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"health/hidden/eff_lr_q50", "stability/logit_rms", "val/loss"} <= tags, sorted(tags)
    # the demo ends with lm-eval zero-shot accuracy on the shipped sample tasks, for every run
    assert "## Zero-shot accuracy on the sample tasks" in report and "| adamw | " in report.split("Zero-shot")[-1]
    for label in ("adamw", "sgd+adalayer(readout+norm)"):
        zs = results[label]["zeroshot"]
        assert set(zs) == {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/arc_challenge/acc",
                           "eval/arc_challenge/acc_norm", "eval/hellaswag/acc", "eval/hellaswag/acc_norm",
                           "eval/mmlu/acc"}
        assert all(0 <= v <= 1 for v in zs.values())
    # 8 ARC-Easy questions: accuracies are multiples of 1/8
    assert results["adamw"]["zeroshot"]["eval/arc_easy/acc"] * 8 == pytest.approx(
        round(results["adamw"]["zeroshot"]["eval/arc_easy/acc"] * 8))


def test_demo_rejects_unknown_runs_before_training(capsys):
    assert main(["demo", "--optimizers", "adamq"]) == 2
    assert "unknown demo run(s) ['adamq']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be ≥ 1"):
        DemoConfig(steps=0)


def test_optimizers_subcommand_lists_the_registry(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert "adalayer" in out and "sophia  (aliases:" in out
