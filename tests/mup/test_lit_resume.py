"""CausalLMModule(mup=...): base shapes built in configure_model, kept by a checkpoint resume, mismatches refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule, LMDataModule

MODEL = {"preset": "llama-tiny", "n_layer": 1, "n_embd": 64, "block_size": 32}


def _dm(tmp_path):
    return LMDataModule(data="embedded", tokenizer="bytes", seq_len=32, batch_size=4, val_batches=1,
                        work_dir=str(tmp_path / "data"))


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _groups(module):
    return sorted((g["role"], g["lr"], len(g["params"])) for g in module.trainer.optimizers[0].param_groups)


def test_resume_keeps_the_multipliers_and_refuses_other_base_shapes(tmp_path):
    torch.set_num_threads(1)
    spec = OptimizerSpec(name="adamw", lr=4e-3)
    first = CausalLMModule(MODEL, spec, mup={"base": 32})
    assert first.spec.mup is True  # asking for μP on the module switches the optimizer rewrite on
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, max_steps=2, callbacks=[ckpt]).fit(first, datamodule=_dm(tmp_path))
    assert first.model.config.logit_scale == 0.5
    groups = _groups(first)
    assert ("hidden", 2e-3, 6) in groups and ("readout", 4e-3, 1) in groups  # q,k,v,o,gate,up: η·32/64
    path = tmp_path / "ckpt" / "step=2.ckpt"
    assert "optlab_mup_base_shapes" in torch.load(path, weights_only=False)

    resumed = CausalLMModule(MODEL, spec, mup=32)
    _trainer(tmp_path, max_steps=3).fit(resumed, datamodule=_dm(tmp_path), ckpt_path=path)
    assert _groups(resumed) == groups
    assert all(hasattr(p, "infshape") for p in resumed.model.parameters())

    with pytest.raises(ValueError, match="base shapes differ"):
        _trainer(tmp_path, max_steps=3).fit(CausalLMModule(MODEL, spec, mup=16), datamodule=_dm(tmp_path), ckpt_path=path)
    with pytest.raises(ValueError, match="trained with μP"):
        _trainer(tmp_path, max_steps=3).fit(CausalLMModule(MODEL, spec), datamodule=_dm(tmp_path), ckpt_path=path)
