"""CausalLMModule with LMDataModule: preset models, metrics, tokens seen, and exact resume of the loss sequence."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule, LMDataModule


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _dm(tmp_path, **kw):
    args = dict(data="embedded", tokenizer="bytes", seq_len=32, batch_size=4, val_batches=2,
                work_dir=str(tmp_path / "data"))
    return LMDataModule(**{**args, **kw})


def _trainer(root, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, **kw)


def _module(name="adamw", **hparams):
    spec = OptimizerSpec(name=name, lr=3e-3, **hparams)
    return CausalLMModule({"preset": "llama-tiny", "n_layer": 1, "n_embd": 32, "block_size": 32}, spec)


def test_preset_model_takes_the_datamodule_vocabulary(tmp_path):
    dm = _dm(tmp_path)
    module = _module()
    _trainer(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=dm)
    assert module.model.config.vocab_size == dm.vocab_size == 257
    assert module.tokens_seen == 2 * 4 * 32


def test_load_from_checkpoint_rebuilds_the_model_without_the_datamodule(tmp_path):
    """The datamodule's vocabulary size goes into the saved model spec."""
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=_dm(tmp_path))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = CausalLMModule.load_from_checkpoint(path, weights_only=False)
    loaded.configure_model()
    assert loaded.model.config.vocab_size == 257
    idx = torch.randint(0, 257, (2, 8))
    assert torch.equal(loaded.eval()(idx), module.eval()(idx))


def test_validation_perplexity_is_exp_of_the_token_weighted_loss(tmp_path):
    dm = _dm(tmp_path)
    module = _module()
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    # direct computation over the same validation batches
    losses, counts = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module(batch[:, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            counts.append(batch[:, 1:].numel())
    assert metrics["val/loss"] == pytest.approx((sum(losses) / sum(counts)).item(), rel=1e-5)


@pytest.mark.parametrize("name, hparams", [
    ("adamw", {}), ("lion", {}), ("adalayer", {}), ("sophia", {"hparams": {"update_period": 2}}),
    ("shampoo", {"hparams": {"precondition_frequency": 3}}),
    ("soap", {"hparams": {"precondition_frequency": 3}}),
    ("muon", {"mix": [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"]}]}),
])
def test_resume_reproduces_the_loss_sequence_exactly(tmp_path, name, hparams):
    n = 4
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=n, save_top_k=-1, filename="{step}")
    straight_rec = LossRecorder()
    straight = _module(name, **hparams)
    _trainer(tmp_path / "a", max_steps=2 * n, callbacks=[ckpt, straight_rec], limit_val_batches=0).fit(
        straight, datamodule=_dm(tmp_path))

    resumed_rec = LossRecorder()
    resumed = _module(name, **hparams)
    trainer = _trainer(tmp_path / "b", max_steps=2 * n, callbacks=[resumed_rec], enable_checkpointing=False,
                       limit_val_batches=0)
    trainer.fit(resumed, datamodule=_dm(tmp_path), ckpt_path=tmp_path / "ckpt" / f"step={n}.ckpt")
    assert len(straight_rec.losses) == 2 * n and len(resumed_rec.losses) == n
    assert resumed_rec.losses == straight_rec.losses[n:]  # exact, not approximate
    assert resumed.tokens_seen == straight.tokens_seen


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    """The optimizer state in a checkpoint belongs to its algorithm: resuming it with another one
    failed deep in torch (KeyError 'momentum') or silently ran with the wrong state."""
    ckpt_dir = tmp_path / "ckpt"
    first = _trainer(tmp_path, max_steps=2, limit_val_batches=0,
                     callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)])
    first.fit(_module("adamw"), datamodule=_dm(tmp_path))
    (path,) = ckpt_dir.glob("*.ckpt")
    with pytest.raises(ValueError, match="trained with optimizer 'adamw'.*asks for 'lion'"):
        _trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(_module("lion"), datamodule=_dm(tmp_path),
                                                                 ckpt_path=str(path))
    # loading the weights for evaluation is not a resume
    assert CausalLMModule.load_from_checkpoint(path, weights_only=False) is not None


def test_sequence_longer_than_the_model_fails_before_training(tmp_path):
    module = CausalLMModule({"preset": "llama-tiny", "n_layer": 1, "n_embd": 32, "block_size": 16}, OptimizerSpec())
    with pytest.raises(ValueError, match="data.seq_len 32 exceeds the model's block_size 16"):
        _trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False).fit(module, datamodule=_dm(tmp_path))
    assert module.global_step == 0
