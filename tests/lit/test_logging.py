"""Logs as Lightning users read them: the optimizer spec in the hyperparameters, param groups named
by role and optimizer (LearningRateMonitor's lr/<name>), a one-line result per finished sweep point."""

from __future__ import annotations

import json

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_optlab import OptimizerSpec, configure
from lightning_optlab.lit import CausalLMModule, LMDataModule
from lightning_optlab.models import build_model
from lightning_optlab.sweep.runner import point_line

MODEL = {"preset": "llama-tiny", "n_layer": 1, "n_embd": 32, "block_size": 32}
MUON = OptimizerSpec(name="muon", lr=0.02, mix=[{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"]}])


def test_the_optimizer_spec_is_in_the_hyperparameters_and_round_trips():
    module = CausalLMModule(MODEL, MUON)
    saved = module.hparams["optimizer"]
    assert saved["name"] == "muon" and saved["lr"] == 0.02 and saved["mix"][0]["optimizer"] == "adamw"
    again = CausalLMModule(MODEL, saved)  # as load_from_checkpoint passes it back
    assert again.spec == MUON
    assert CausalLMModule(build_model(MODEL), MUON).hparams["optimizer"]["schedule"] == "constant"


def test_param_groups_are_named_role_slash_optimizer():
    groups = configure(build_model(MODEL), MUON)["optimizer"].param_groups
    assert sorted(g["name"] for g in groups) == ["embedding/adamw", "hidden/muon", "norm/adamw", "readout/adamw"]


def test_learning_rate_monitor_logs_lr_per_named_group(tmp_path):
    dm = LMDataModule(data="embedded", tokenizer="bytes", seq_len=32, batch_size=2, val_batches=1,
                      work_dir=str(tmp_path / "data"))
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[monitor])
    trainer.fit(CausalLMModule(MODEL, MUON), datamodule=dm)
    assert {"lr/hidden/muon", "lr/readout/adamw"} <= set(monitor.lrs)


def test_a_finished_sweep_point_is_one_line(tmp_path):
    d = tmp_path / "adamw-lr0.001-s0"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"status": "done", "final_val_loss": 4.25, "final_train_loss": 4.5}))
    assert point_line(d, {}) == "adamw-lr0.001-s0: done, val loss 4.2500, train loss 4.5000"
    assert point_line(d, {d.name: "Traceback\nValueError: bad lr\n"}) == "adamw-lr0.001-s0: failed (ValueError: bad lr)"


def test_hp_metric_is_the_latest_validation_loss(tmp_path):
    dm = LMDataModule(data="embedded", tokenizer="bytes", seq_len=32, batch_size=2, val_batches=1,
                      work_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, limit_val_batches=1,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(CausalLMModule(MODEL, MUON), datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.equal(metrics["hp_metric"], metrics["val/loss"])
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "optimizer:" in hparams and "name: muon" in hparams
