"""ScheduleFreeModeSwitch: y while training, x in validation and in checkpoints, bitwise resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_optlab.callbacks.schedule_free import (
    ScheduleFreeModeSwitch,
    attach_schedule_free_switch,
    schedule_free_optimizers,
)
from lightning_optlab.optim.mix import OptimizerMix
from lightning_optlab.optim.schedule_free import ScheduleFreeAdamW

BATCHES_PER_EPOCH = 4


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * BATCHES_PER_EPOCH, 3, generator=g)
    y = x @ torch.randn(3, 2, generator=g) + 0.1
    return x, y


def _loader():
    return DataLoader(TensorDataset(*_data()), batch_size=4, shuffle=False)


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


class LinearModule(L.LightningModule):
    def __init__(self, attach: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 2)
        self.attach = attach
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(_snapshot(self))
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen["val"].append(_snapshot(self))
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x), y))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(_snapshot(self))

    def configure_optimizers(self):
        opt = ScheduleFreeAdamW(self.parameters(), lr=0.05, warmup_steps=2, weight_decay=0.01)
        if self.attach:
            attach_schedule_free_switch(self)
            attach_schedule_free_switch(self)  # idempotent
        return opt


def _reference(epochs: int, roundtrip: bool = True):
    """Plain PyTorch: the y seen by every training step, and x after every epoch (then back to y).

    ``roundtrip``: y is recomputed from x by ``train()``; else y is restored exactly (what the
    callback does around validation and checkpoint saves: neither may perturb training).
    """
    module = LinearModule()
    opt = ScheduleFreeAdamW(module.parameters(), lr=0.05, warmup_steps=2, weight_decay=0.01)
    ys, xs = [], []
    for _ in range(epochs):
        for x, y in _loader():
            ys.append(_snapshot(module))
            opt.zero_grad()
            F.mse_loss(module.layer(x), y).backward()
            opt.step()
        y_exact = _snapshot(module)
        opt.eval()
        xs.append(_snapshot(module))
        opt.train()
        if not roundtrip:
            with torch.no_grad():
                for p, y in zip(module.parameters(), y_exact):
                    p.copy_(y)
    return ys, xs


def _trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kw})


def _assert_equal_lists(a, b, what):
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} snapshots"
    for i, (pa, pb) in enumerate(zip(a, b)):
        for ta, tb in zip(pa, pb):
            assert torch.equal(ta, tb), f"{what} #{i} differs by {(ta - tb).abs().max().item():.3e}"


def test_validation_sees_the_eval_weights_and_training_the_y_weights(tmp_path):
    module = LinearModule()
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=1, enable_checkpointing=False,
                       callbacks=[ScheduleFreeModeSwitch()])
    trainer.fit(module, _loader(), _loader())
    # a validation pass leaves y bit for bit (a run with validation trains as one without)
    ys, xs = _reference(epochs=2, roundtrip=False)
    _assert_equal_lists(module.seen["train"], ys, "training-step weights (y)")
    _assert_equal_lists(module.seen["val"], xs, "validation weights (x)")
    assert not module.seen["train"][0][0].equal(xs[0][0])  # x and y do differ
    # after fit the module holds x (up to the rounding of one more y -> x round trip), the
    # optimizer is in eval mode, and testing keeps it so
    assert not trainer.optimizers[0].train_mode
    for p, x in zip(module.parameters(), xs[-1]):
        torch.testing.assert_close(p.detach(), x)
    final = _snapshot(module)
    trainer.test(module, _loader(), verbose=False)
    _assert_equal_lists(module.seen["test"][:1], [final], "test weights")


def test_checkpoint_holds_eval_weights_and_resume_is_bitwise(tmp_path):
    ckpt_dir = tmp_path / "ckpt"

    def fit(module, dirpath, **kw):
        cb = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", every_n_epochs=1, save_top_k=-1,
                             save_on_train_epoch_end=True)
        trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[cb])
        trainer.fit(module, _loader(), **kw)
        return trainer

    module_a = LinearModule(attach=True)
    trainer_a = fit(module_a, ckpt_dir)
    switches = [cb for cb in trainer_a.callbacks if isinstance(cb, ScheduleFreeModeSwitch)]
    assert len(switches) == 1  # added once by configure_optimizers
    ys, xs = _reference(epochs=3, roundtrip=False)
    _assert_equal_lists(module_a.seen["train"], ys, "training-step weights (y)")

    ckpt = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=False)
    _assert_equal_lists([list(ckpt["state_dict"].values())], xs[:1], "checkpointed weights")
    assert ckpt["optimizer_states"][0]["param_groups"][0]["train_mode"] is False

    module_b = LinearModule(attach=True)
    fit(module_b, tmp_path / "ckpt_b", ckpt_path=str(ckpt_dir / "epoch=0.ckpt"))
    _assert_equal_lists(module_b.seen["train"], ys[BATCHES_PER_EPOCH:], "resumed training-step weights")
    _assert_equal_lists([_snapshot(module_b)], [_snapshot(module_a)], "final weights after resume")


def test_attach_without_a_trainer_is_a_no_op():
    assert attach_schedule_free_switch(nn.Linear(2, 2)) is None


def test_finds_schedule_free_optimizers_inside_wrappers_and_mixes():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    sf = ScheduleFreeAdamW([b])
    adamw = torch.optim.AdamW([a])
    mix = OptimizerMix([adamw, sf])
    assert list(schedule_free_optimizers([mix])) == [sf]
    assert list(schedule_free_optimizers([LightningOptimizer(sf), adamw])) == [sf]
    assert list(schedule_free_optimizers(adamw)) == []


@pytest.mark.parametrize("hook", ["on_validation", "on_test", "on_predict"])
def test_evaluation_hooks_restore_the_previous_mode(hook):
    p = nn.Parameter(torch.randn(4))
    sf = ScheduleFreeAdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(4)
        sf.step()
    y = p.detach().clone()

    class _T:
        optimizers = [sf]

    cb = ScheduleFreeModeSwitch()
    getattr(cb, f"{hook}_start")(_T(), None)
    assert not sf.train_mode and not torch.equal(p, y)
    getattr(cb, f"{hook}_end")(_T(), None)
    assert sf.train_mode
    torch.testing.assert_close(p.detach(), y)
