"""``LMDataModule``: SlimPajama-format data for Lightning, resumable at the exact token.

A thin wrapper over :class:`lightning_optlab.data.DataPipeline` (plain PyTorch): Lightning's
``prepare_data`` writes the embedded corpus and trains the BPE once per machine, ``setup`` loads
the tokenizer and shards the data by ``trainer.global_rank`` / ``trainer.world_size``, and the
loaders yield ``(batch_size, seq_len + 1)`` LongTensors (``CausalLMModule`` splits them into inputs
``batch[:, :-1]`` and targets ``batch[:, 1:]``).

Position. Lightning prefetches batches ahead of the training step, and dataloader workers live
in other processes, so neither can say where the training loop really is. The module counts the
training batches that reach the loop (``on_before_batch_transfer`` runs once per batch the loop
takes, after prefetching), saves that count in the checkpoint through ``state_dict``, and on
resume builds the stream to start at that batch (see :mod:`lightning_optlab.data.stream`), so
training continues at the very token where the checkpointed run was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from ..data import DataConfig, DataPipeline, TextTokenizer

__all__ = ["LMDataModule"]


class LMDataModule(L.LightningDataModule):
    """Language-model batches from local SlimPajama/C4 shards, prepared token shards, the embedded corpus, or the hub.

    Every argument is a field of :class:`lightning_optlab.data.DataConfig` (documented there)::

        dm = LMDataModule(data="embedded", tokenizer="bpe", vocab_size=2048, seq_len=128, batch_size=16)
        dm.prepare_data(); dm.setup("fit")
        model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=128))
        trainer.fit(CausalLMModule(model, spec), datamodule=dm)

    ``data=DIR``, a directory made by ``optlab data prepare``, reads its token shards by position
    (its own tokenizer; a resume costs nothing). After ``setup`` the tokenizer is also written as ``tokenizer.json`` into the trainer's log
    directory (or ``default_root_dir``), beside the run, for evaluation to reload.
    """

    def __init__(self, *, data: str | list[str] = "embedded", val_data: str | list[str] | None = None,
                 sources: list[str] | None = None, tokenizer: str | None = None, eos_token: str = "<|endoftext|>",
                 vocab_size: int = 4096,
                 bpe_train_chars: int = 20_000_000, seq_len: int = 128, batch_size: int = 16, num_workers: int = 0,
                 val_fraction: float | None = None, val_batches: int = 8, shuffle_buffer: int = 0,
                 shard_by: str = "auto", shuffle: bool = False, seed: int = 0, work_dir: str = "optlab_runs/data",
                 allow_download: bool = False, hub_split: str = "train") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = DataConfig(
            data=data, val_data=val_data, sources=sources, tokenizer=tokenizer, eos_token=eos_token,
            vocab_size=vocab_size,
            bpe_train_chars=bpe_train_chars, seq_len=seq_len, batch_size=batch_size, num_workers=num_workers,
            val_fraction=val_fraction, val_batches=val_batches, shuffle_buffer=shuffle_buffer, shard_by=shard_by,
            shuffle=shuffle, seed=seed, work_dir=work_dir, allow_download=allow_download, hub_split=hub_split)
        self.pipeline = DataPipeline(self.config)
        #: training batches handed to the training loop so far (the stream position)
        self.batches_consumed = 0

    @classmethod
    def from_config(cls, config: DataConfig) -> LMDataModule:
        return cls(**{k: getattr(config, k) for k in config.__dataclass_fields__})

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def prepare_data(self) -> None:
        self.pipeline.prepare()

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = self._dist()
        self.pipeline.setup(rank, world_size)
        trainer = self.trainer
        if trainer is not None:
            run_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: ask on every rank
            if rank == 0:
                self.pipeline.save_tokenizer(Path(run_dir))

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (after ``setup``)."""
        return self.pipeline.tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed (after ``setup``)."""
        return self.pipeline.vocab_size

    def train_dataloader(self) -> DataLoader:
        return self.pipeline.loader(self.pipeline.train_dataset(self.batches_consumed))

    def val_dataloader(self) -> DataLoader | list:
        if self.config.val_batches == 0:
            return []
        return self.pipeline.val_loader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called once for each batch the training loop takes (prefetched ones are not counted)
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.pipeline.state_dict(self.batches_consumed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_consumed = self.pipeline.load_state_dict(state_dict)
