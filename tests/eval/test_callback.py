"""ZeroShotEval through Lightning: logs, results JSON, Schedule-Free eval weights, 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.eval import (HubUnreachableError, ModuleLM, ZeroShotEval, metrics_from_results, prepare_samples,
                                   run_tasks)
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig

torch.set_num_threads(1)
SCRIPT = Path(__file__).with_name("ddp_eval_script.py")


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.logged = []

    name, version = "mem", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    prepare_samples(out)
    return out


def _module(optimizer="adamw"):
    torch.manual_seed(0)
    module = CausalLMModule(GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=16)),
                            OptimizerSpec(name=optimizer, lr=3e-3, **({"schedule": "constant"} if "schedule_free"
                                                                      in optimizer else {})))
    module.tokenizer = ByteTokenizer()
    return module


def _fit(module, cb, tmp_path, steps=4):
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path, log_every_n_steps=1)
    torch.manual_seed(1)
    trainer.fit(module, DataLoader(list(torch.randint(0, 257, (16, 17))), batch_size=2))
    return trainer, logger


def test_logs_every_n_steps_and_at_fit_end_and_writes_results(task_dir, tmp_path):
    cb = ZeroShotEval(["arc_easy", "hellaswag", "mmlu"], task_dir=task_dir, every_n_steps=2, limit=3,
                      results_dir=tmp_path / "res")
    module = _module()
    trainer, logger = _fit(module, cb, tmp_path)
    evals = [(s, m) for s, m in logger.logged if any(k.startswith("eval/") for k in m)]
    # after updates 2 and 4 (fit end at step 4 is not evaluated twice), at the index of their train/loss
    assert [s for s, _ in evals] == [1, 3]
    assert {1, 3} <= {s for s, m in logger.logged if "train/loss" in m}
    assert set(evals[-1][1]) == {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/hellaswag/acc",
                                 "eval/hellaswag/acc_norm", "eval/mmlu/acc"}
    assert float(trainer.callback_metrics["eval/mmlu/acc"]) == pytest.approx(evals[-1][1]["eval/mmlu/acc"])
    saved = json.loads((tmp_path / "res" / "zeroshot_step4.json").read_text())
    assert saved["results"]["arc_easy"]["acc,none"] == evals[-1][1]["eval/arc_easy/acc"]
    assert saved["n-samples"]["arc_easy"]["effective"] == 3
    # the same numbers as the adapter on the final model, outside Lightning
    direct = run_tasks(ModuleLM(module, ByteTokenizer()), ["arc_easy", "hellaswag", "mmlu"], task_dir=task_dir, limit=3)
    assert metrics_from_results(direct, ["arc_easy", "hellaswag", "mmlu"]) == pytest.approx(evals[-1][1])
    assert cb.state_dict()["history"][-1][0] == 4


def test_schedule_free_is_evaluated_at_its_eval_weights(task_dir, tmp_path):
    seen = []

    class Spy(ZeroShotEval):
        def evaluate(self, trainer, pl_module):
            (opt,) = trainer.optimizers
            out = super().evaluate(trainer, pl_module)
            seen.append(all(g["train_mode"] for g in opt.param_groups))  # back in train mode afterwards
            return out

    module = _module("schedule_free_adamw")
    cb = Spy(["arc_easy"], task_dir=task_dir, every_n_steps=2, limit=2)
    modes = []
    orig = module.forward
    module.forward = lambda idx: (modes.append(module.trainer.optimizers[0].param_groups[0]["train_mode"])
                                  if not torch.is_grad_enabled() else None) or orig(idx)
    _fit(module, cb, tmp_path, steps=2)
    assert modes and not any(modes)  # every evaluation forward ran on x, the eval weights
    assert seen == [True]  # mid-training evaluation handed training back in train mode


def test_tokenizer_from_the_datamodule_and_hub_failure_without_network(task_dir, tmp_path, monkeypatch):
    import time

    class Data(L.LightningDataModule):
        tokenizer = ByteTokenizer()

        def train_dataloader(self):
            return DataLoader(list(torch.randint(0, 257, (2, 17))), batch_size=2)

    module = _module()
    del module.tokenizer
    cb = ZeroShotEval(["arc_easy"], task_dir=task_dir, limit=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(module, datamodule=Data())
    assert (tmp_path / "zeroshot_step1.json").is_file() and "eval/arc_easy/acc" in trainer.callback_metrics
    # the built-in (hub) tasks without network: a fast, clear error
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ZeroShotEval()],
                        default_root_dir=tmp_path)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="optlab eval prepare"):
        trainer.fit(_module(), datamodule=Data())
    assert time.perf_counter() - start < 15


def test_missing_tokenizer_and_bad_arguments(task_dir, tmp_path):
    module = _module()
    del module.tokenizer
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _fit(module, ZeroShotEval(["arc_easy"], task_dir=task_dir, limit=1), tmp_path, steps=1)
    with pytest.raises(ValueError, match="every_n_steps must be ≥ 1"):
        ZeroShotEval(every_n_steps=0)
    with pytest.raises(ValueError, match="distributed must be"):
        ZeroShotEval(distributed="all")


def test_two_process_ddp_finishes_and_sharding_matches_rank_zero(task_dir, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    out = tmp_path / "two.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "2", str(task_dir), str(out)], capture_output=True,
                         text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logged = json.loads(out.read_text())
    assert logged["world_size"] == 2
    assert [s for s, _ in logged["shard"]] == [1, 2] and [s for s, _ in logged["rank0"]] == [2]
    assert logged["shard"][-1][1] == pytest.approx(logged["rank0"][0][1])  # same weights, same documents
    for folder in ("two.json_shard", "two.json_rank0"):
        saved = json.loads((tmp_path / folder / "zeroshot_step2.json").read_text())
        assert saved["n-samples"]["arc_easy"]["effective"] == 8  # both ranks' shares gathered
        assert saved["results"]["arc_easy"]["acc,none"] == logged["rank0"][0][1]["eval/arc_easy/acc"]
    assert 0 <= logged["rank0"][0][1]["eval/mmlu/acc"] <= 1


def test_fit_end_after_a_resume_at_the_evaluated_step_restores_the_scores():
    """A run resumed from a checkpoint taken right after its last evaluation (a sweep point killed
    after its final checkpoint) does not evaluate again; its scores must still reach
    callback_metrics, which a sweep reads for its table."""
    from types import SimpleNamespace

    cb = ZeroShotEval(tasks=["arc_easy"], task_dir="samples")
    cb.load_state_dict({"history": [(2, {"eval/arc_easy/acc": 0.25}), (4, {"eval/arc_easy/acc": 0.5})], "last_step": 4})
    trainer = SimpleNamespace(global_step=4, callback_metrics={})
    cb.on_fit_end(trainer, None)
    assert float(trainer.callback_metrics["eval/arc_easy/acc"]) == 0.5
