"""`optlab eval` on a saved CausalLMModule checkpoint (weights_only loading) and `optlab eval prepare`."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.eval import ModuleLM, metrics_from_results, run_tasks
from lightning_optlab.eval.cli import main
from lightning_optlab.lit import CausalLMModule

torch.set_num_threads(1)
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu"]


class Opaque:  # an object that only a full unpickling can rebuild
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = CausalLMModule({"preset": "gpt2-tiny", "vocab_size": 257, "block_size": 32, "n_layer": 1},
                            OptimizerSpec(name="adamw", lr=1e-3))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, DataLoader(list(torch.randint(0, 257, (4, 33))), batch_size=2))
    (root / "ckpts").mkdir()
    trainer.save_checkpoint(root / "ckpts" / "last.ckpt")
    ByteTokenizer().save(root / "tokenizer.json")  # where LMDataModule writes it: beside the run
    tasks = root / "tasks"
    assert main(["prepare", "--samples", "--out", str(tasks)]) == 0
    return root, module, tasks


def test_eval_prints_the_table_of_the_checkpoints_model(run, capsys, tmp_path):
    root, module, tasks = run
    out = tmp_path / "results.json"
    assert main(["--ckpt", str(root / "ckpts" / "last.ckpt"), "--task-dir", str(tasks), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| last.ckpt |" in printed and "arc_easy acc_norm" in printed and "mmlu acc" in printed
    saved = json.loads(out.read_text())
    ours = metrics_from_results(saved, TASKS)
    direct = metrics_from_results(run_tasks(ModuleLM(module.model, ByteTokenizer()), TASKS, task_dir=tasks), TASKS)
    assert ours == pytest.approx(direct)
    for key, value in ours.items():
        assert f"{value:.3f}" in printed, key


def test_unsafe_checkpoint_needs_an_explicit_opt_in(run, capsys, tmp_path):
    root, _, tasks = run
    ckpt = torch.load(root / "ckpts" / "last.ckpt", weights_only=True)
    ckpt["extra"] = Opaque()
    torch.save(ckpt, tmp_path / "unsafe.ckpt")
    args = ["--ckpt", str(tmp_path / "unsafe.ckpt"), "--tokenizer", "bytes", "--task-dir", str(tasks),
            "--tasks", "arc_easy", "--limit", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "weights_only=True refuses" in err and "--trust-checkpoint" in err
    assert main(args + ["--trust-checkpoint"]) == 0
    assert main(args[:4] + ["--task-dir", "samples", "--tasks", "mmlu", "--trust-checkpoint"]) == 0
    assert "| unsafe.ckpt |" in capsys.readouterr().out


def test_prepare_and_eval_report_bad_input(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "t")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err
    assert main(["prepare", "--arc", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "ARC-Easy-Test.jsonl" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_a_damaged_checkpoint_is_diagnosed_as_damaged_not_unsafe(run, capsys, tmp_path, kind):
    root, _, tasks = run
    good = (root / "ckpts" / "last.ckpt").read_bytes()
    bad = tmp_path / f"{kind}.ckpt"
    bad.write_bytes({"random": bytes(range(256)) * 20, "empty": b"", "truncated": good[: len(good) // 3]}[kind])
    args = ["--ckpt", str(bad), "--tokenizer", "bytes", "--task-dir", str(tasks), "--tasks", "arc_easy", "--limit", "2"]
    for extra in ([], ["--trust-checkpoint"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and "--trust-checkpoint" not in err and "EOFError" not in err, err
        assert ("not a torch checkpoint" if kind == "random" else "is damaged") in err


def test_offline_eval_keeps_the_datasets_cache_beside_the_task_files(run, capsys, tmp_path, monkeypatch):
    import datasets.config

    root, _, tasks = run
    user_cache = tmp_path / "user_hf_cache"
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", user_cache)
    local = tmp_path / "tasks"
    assert main(["prepare", "--samples", "--out", str(local)]) == 0
    assert main(["--ckpt", str(root / "ckpts" / "last.ckpt"), "--task-dir", str(local), "--tasks", "arc_easy",
                 "--limit", "2"]) == 0
    assert f"task data cache: {local / '.datasets_cache'}" in capsys.readouterr().out
    assert not user_cache.exists() or not any(user_cache.rglob("*"))  # nothing written to the user's cache
    assert any((local / ".datasets_cache").rglob("*.arrow"))
    assert datasets.config.HF_DATASETS_CACHE == user_cache  # restored after the load
