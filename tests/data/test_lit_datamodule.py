"""LMDataModule through Lightning: batches for CausalLMModule, the tokenizer beside the run, exact resume."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
from _shards import make_docs, write_corpus
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_optlab import OptimizerSpec
from lightning_optlab.data import DataConfig, load_tokenizer
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.lit.datamodule import LMDataModule
from lightning_optlab.models import GPT, GPTConfig


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.batches.append(batch.detach().cpu().clone())


def _dm(tmp_path, root, **kw):
    kw = {"data": str(root), "seq_len": 16, "batch_size": 4, "val_batches": 2, "val_fraction": 0.2,
          "work_dir": str(tmp_path / "work"), **kw}
    return LMDataModule(**kw)


def _fit(tmp_path, name, dm, steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    dm.setup("fit")
    model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    module = CausalLMModule(model, OptimizerSpec(name="adamw", lr=3e-3))
    rec = BatchRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / name, val_check_interval=3,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[rec, *callbacks],
                        enable_checkpointing=bool(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, rec.batches, trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_fit_resumes_at_the_same_token(tmp_path, workers):
    root = write_corpus(tmp_path / "shards", make_docs(30), n_shards=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    straight, seen, trainer = _fit(tmp_path, "a", _dm(tmp_path, root, num_workers=workers), 7, callbacks=[ckpt])
    assert len(seen) == 7 and all(b.shape == (4, 17) and b.dtype == torch.long for b in seen)
    assert trainer.datamodule.batches_consumed == 7
    assert "val/loss" in trainer.callback_metrics

    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["LMDataModule"]
    assert state["batches_consumed"] == 3 and state["num_workers"] == workers

    resumed, seen_after, _ = _fit(tmp_path, "b", _dm(tmp_path, root, num_workers=workers), 7,
                                  ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert len(seen_after) == 4
    for i, (a, b) in enumerate(zip(seen[3:], seen_after)):
        assert torch.equal(a, b), f"batch {3 + i} differs after resume"
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_embedded_bpe_run_saves_its_tokenizer(tmp_path):
    dm = LMDataModule(data="embedded", tokenizer="bpe", vocab_size=512, seq_len=16, batch_size=4, val_batches=1,
                      work_dir=str(tmp_path / "work"))
    dm.prepare_data()
    _, seen, trainer = _fit(tmp_path, "run", dm, 2)
    assert dm.vocab_size == 512
    saved = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert saved.fingerprint() == dm.tokenizer.fingerprint()
    text = dm.tokenizer.decode(seen[0][0].tolist())
    assert "<|endoftext|>" not in text[:20] and len(text) > 16  # real prose, several bytes per id
    with pytest.raises(ValueError, match="different tokenizer"):
        other = LMDataModule(data="embedded", seq_len=16, batch_size=4, work_dir=str(tmp_path / "work"))
        other.setup()
        other.load_state_dict(dm.state_dict())


def test_validation_batches_are_fixed_and_per_rank(tmp_path):
    root = write_corpus(tmp_path / "shards", make_docs(60), n_shards=2)
    dm = _dm(tmp_path, root, val_batches=3)
    dm.setup()
    first = list(dm.val_dataloader())
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, dm.val_dataloader()))
    other = _dm(tmp_path, root, val_batches=3)
    other.pipeline.setup(rank=1, world_size=2)
    assert not torch.equal(other.pipeline.validation_batches(), torch.stack(first))
    assert _dm(tmp_path, root, val_batches=0).val_dataloader() == []


def test_config_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="seq_len must be an integer ≥ 1, got 0"):
        DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="val_fraction must be in \\[0, 1\\), got 1.5"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="no validation data"):
        DataConfig(val_fraction=0.0)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: nope.json"):
        DataConfig(tokenizer="nope.json")
    with pytest.raises(ValueError, match="vocab_size must be ≥ 258"):
        DataConfig(tokenizer="bpe", vocab_size=100)
    with pytest.raises(ValueError, match="cannot be combined"):
        DataConfig(data=["embedded", "/data"])
    assert DataConfig(val_data="/val").val_fraction == 0.0 and DataConfig().val_fraction == 0.05
    with pytest.raises(FileNotFoundError, match="does not exist: .*missing"):
        LMDataModule(data=str(tmp_path / "missing")).setup()


def test_data_core_never_imports_lightning():
    """CONVENTIONS #1, statically: no module under lightning_optlab/data imports lightning."""
    import lightning_optlab.data as data

    for path in Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path
