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


class StepLogger(L.pytorch.loggers.Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``, as CSV/TensorBoard loggers receive them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    name = "steps"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def steps_of(self, prefix):
        return sorted({s for s, m in self.calls if any(k.startswith(prefix) for k in m)})


def _fit_with_callbacks(tmp_path, callbacks, spec=MUON, steps=3):
    from lightning_optlab.lit import LMDataModule

    dm = LMDataModule(data="embedded", tokenizer="bytes", seq_len=32, batch_size=2, val_batches=1,
                      work_dir=str(tmp_path / "data"))
    logger = StepLogger()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path / "run")
    torch.manual_seed(0)
    trainer.fit(CausalLMModule(MODEL, spec), datamodule=dm)
    return trainer, logger


def test_each_quantity_once_under_one_name_and_every_callback_on_train_losss_step(tmp_path):
    from lightning_optlab.callbacks import PreconditionerHealth, StabilityMonitor, WallClock

    callbacks = [WallClock(log_every_n_steps=1, verbose=False), PreconditionerHealth(every_n_steps=1, plot=False),
                 StabilityMonitor(every_n_steps=1)]
    _, logger = _fit_with_callbacks(tmp_path, callbacks)
    keys = [k for _, m in logger.calls for k in m if k not in ("epoch",)]
    # tokens: train/tokens only; the update/weight ratio: PreconditionerHealth's update_to_weight only
    assert "train/tokens" in keys and not any(k == "wallclock/tokens" for k in keys)
    assert "health/hidden/update_to_weight" in keys and not any("update_ratio" in k for k in keys)
    # one value per key and step
    per_step = {}
    for s, m in logger.calls:
        for k in m:
            assert (s, k) not in per_step, f"{k} logged twice at step {s}"
            per_step[(s, k)] = True
    # the callbacks log at train/loss's indices (Lightning's: update k at k - 1)
    loss_steps = logger.steps_of("train/loss")
    assert loss_steps == [0, 1, 2]
    for prefix in ("health/", "wallclock/", "stability/"):
        steps = logger.steps_of(prefix)
        assert steps and set(steps) <= set(loss_steps), (prefix, steps, loss_steps)
    assert logger.steps_of("health/") == logger.steps_of("wallclock/step_seconds") == loss_steps


def test_stability_measures_the_update_ratio_without_preconditioner_health(tmp_path):
    from lightning_optlab.callbacks import StabilityMonitor

    _, logger = _fit_with_callbacks(tmp_path, [StabilityMonitor(every_n_steps=1)], steps=2)
    assert any(k.startswith("stability/update_ratio_role/") for _, m in logger.calls for k in m)


def test_health_tags_per_role_by_default_per_parameter_on_request(tmp_path):
    from lightning_optlab.callbacks import PreconditionerHealth

    def tags(cb):
        _, logger = _fit_with_callbacks(tmp_path, [cb], steps=2)
        return {k for _, m in logger.calls for k in m if k.startswith("health")}

    default = tags(PreconditionerHealth(every_n_steps=1, plot=False))
    assert not any(k.startswith("health_param/") for k in default)
    assert 10 <= len(default) <= 80, sorted(default)  # measured: 48 tags on this 1-layer model (191 per parameter)
    per_param = tags(PreconditionerHealth(every_n_steps=1, plot=False, per_parameter=True))
    assert default < per_param and len(per_param) > 2 * len(default)
    assert "health_param/model.blocks.0.attn.q_proj.weight/ortho_error" in per_param


def test_the_health_figure_names_optimizers_learning_rates_and_run(tmp_path):
    from lightning_optlab.callbacks import PreconditionerHealth
    from lightning_optlab.callbacks.health import _panel_specs, figure_title

    spec = OptimizerSpec(name="muon", lr=0.02, mix=[{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"],
                                                     "lr": 3e-3}])
    cb = PreconditionerHealth(every_n_steps=1, plot_path=tmp_path / "health.png")
    _fit_with_callbacks(tmp_path, [cb], spec=spec, steps=2)
    title = figure_title(cb.series)
    assert "muon lr 0.02 (hidden) / adamw lr 0.003 (embedding, norm, readout)" in title
    assert title.endswith(f"· run {tmp_path.parent.name}/{tmp_path.name}/run")  # the log folder's last three parts
    panels = {t: role for t, role, _ in _panel_specs(cb.series)}
    assert panels["blocks.0.attn.q_proj.weight"] == "hidden, muon" and panels["lm_head.weight"] == "readout, adamw"
    assert (tmp_path / "health.png").stat().st_size > 10_000
