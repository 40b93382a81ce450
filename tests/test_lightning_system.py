"""System tests: a tiny GPT trains through Lightning with configure() and resumes bitwise."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig

SPECS = {
    "adamw": dict(name="adamw", lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=2, total_steps=8),
    "lion": dict(name="lion", lr=3e-4, weight_decay=0.1, schedule="wsd", warmup_steps=1, total_steps=8),
    "adafactor": dict(name="adafactor", lr=3e-3, schedule="linear", total_steps=8),
    "sophia": dict(name="sophia", lr=3e-4, hparams={"update_period": 2}),
    "sgd+adalayer": dict(name="sgd", lr=0.1, betas=(0.98, 0.0),
                         mix=[dict(optimizer="adalayer", roles=["readout", "norm"], lr=3e-3)]),
    "schedule_free_adamw": dict(name="schedule_free_adamw", lr=3e-3),
    "shampoo": dict(name="shampoo", lr=3e-3, hparams={"precondition_frequency": 2}),
    "soap": dict(name="soap", lr=3e-3, hparams={"precondition_frequency": 2}),
    "muon+adamw": dict(name="muon", lr=0.02, mix=[dict(optimizer="adamw", roles=["embedding", "readout", "norm", "bias"],
                                                       lr=3e-3)]),
}


def _data(n_batches=4, batch=4, seq=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (n_batches * batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1) * torch.randint(1, 3, (n_batches * batch, 1), generator=g)) % 32
    return DataLoader(list(tokens), batch_size=batch, shuffle=False)


def _module(spec):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return CausalLMModule(model, OptimizerSpec(**spec))


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("label", sorted(SPECS))
def test_trains_and_resumes_bitwise(label, tmp_path):
    """A run resumed from its own mid-run checkpoint ends bit-identical to the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    spec = SPECS[label]
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    straight = _module(spec)
    _trainer(tmp_path / "a", max_steps=8, callbacks=[ckpt_cb]).fit(straight, _data())

    resumed = _module(spec)
    trainer = _trainer(tmp_path / "c", max_steps=8, enable_checkpointing=False)
    trainer.fit(resumed, _data(), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert trainer.global_step == 8

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), f"{label}: {name} differs after resume by {(a - b).abs().max():.3e}"
    moved = any(not torch.equal(a, b) for a, b in zip(straight.parameters(), _module(spec).parameters()))
    assert moved


def test_training_lowers_validation_loss(tmp_path):
    module = _module(dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=2, total_steps=40))
    data = _data(n_batches=10)
    trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=False)
    before = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data, data)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < before - 0.5, (before, after)


def test_scheduler_steps_per_optimizer_step(tmp_path):
    module = _module(dict(name="adamw", lr=1.0, schedule="linear", warmup_steps=0, total_steps=4, min_lr_ratio=0.0))
    _trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, _data())
    lrs = [g["lr"] for g in module.optimizers().optimizer.param_groups]
    assert lrs == pytest.approx([0.5] * len(lrs))
