"""``DataConfig`` and ``DataPipeline``: the whole data path of a run, without Lightning.

``DataPipeline`` turns a :class:`DataConfig` into a tokenizer, a resumable training
``DataLoader`` and a fixed set of validation batches. ``LMDataModule`` (``lightning_optlab.lit``)
is a thin Lightning wrapper over it; a plain PyTorch loop uses it directly::

    pipe = DataPipeline(DataConfig(data="embedded", tokenizer="bpe", vocab_size=2048, seq_len=128))
    pipe.prepare()          # once per machine: write the embedded shards, train the BPE
    pipe.setup()            # every process: readers and tokenizer (rank, world_size for DDP)
    train = pipe.train_dataset()
    for step, batch in enumerate(pipe.loader(train)):   # (batch_size, seq_len + 1) LongTensors
        ...; train.record_batches()                     # position for pipe.state_dict(...)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .corpus import embedded_set_dir, parse_embedded, write_embedded_shards
from .hub import HUB_PREFIX, HubReader
from .reader import ShardReader
from .shards import TOKENIZER_NAME, TokenShardDataset, TokenShards, is_prepared, load_index
from .stream import SHARD_BY, PackedDataset, split_texts
from .tokenizer import ByteTokenizer, TextTokenizer, train_bpe

__all__ = ["DataConfig", "DataPipeline"]

EMBEDDED = "embedded"


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes batches of token ids."""

    #: shard files, directories or glob patterns; a directory made by `optlab data prepare` (token
    #: shards, read by position); "embedded" (CPython's docs, written as shards under work_dir),
    #: "embedded:all" (docs and the stdlib's sources) or "embedded:CPythonSource"; or
    #: "hub:<owner>/<name>" to stream from the hub (needs allow_download)
    data: str | list[str] = EMBEDDED
    #: separate validation shards (e.g. SlimPajama's validation/ folder); None: the hash split of `data`
    val_data: str | list[str] | None = None
    #: keep only documents whose meta.redpajama_set_name is listed (None: all)
    sources: list[str] | None = None
    #: "bytes" (UTF-8 bytes, 257 ids), "bpe" (byte-level BPE trained on the training split) or a tokenizer.json
    #: path; None: "bytes" for text, the directory's own tokenizer.json for prepared token shards
    tokenizer: str | None = None
    #: end-of-document token of a tokenizer file (e.g. "</s>" for T5's); "bytes" and "bpe" use <|endoftext|>
    eos_token: str = "<|endoftext|>"
    #: vocabulary size of the trained BPE (tokenizer="bpe")
    vocab_size: int = 4096
    #: characters of training text the BPE learns from
    bpe_train_chars: int = 20_000_000
    #: tokens per training sequence (blocks hold seq_len + 1)
    seq_len: int = 128
    #: sequences per batch, per process
    batch_size: int = 16
    #: DataLoader worker processes per rank (0: read in the training process)
    num_workers: int = 0
    #: fraction of documents held out for validation by text hash; None: 0.05, or 0 when val_data is set
    val_fraction: float | None = None
    #: validation batches per rank, fixed for the whole run (0: no validation)
    val_batches: int = 8
    #: blocks in the streaming shuffle buffer (0: read order)
    shuffle_buffer: int = 0
    #: how streams share the data: "document", "file" or "auto"
    shard_by: str = "auto"
    #: token shards: a seeded permutation of all blocks in every epoch (streaming data: use shuffle_buffer)
    shuffle: bool = False
    #: seed of the shuffle buffer and of the token shards' block permutation
    seed: int = 0
    #: folder for the embedded corpus's shards and trained tokenizers
    work_dir: str = "optlab_runs/data"
    #: permit data="hub:..." to stream over the network
    allow_download: bool = False
    #: split of the hub data set
    hub_split: str = "train"

    def __post_init__(self) -> None:
        for name, low in (("seq_len", 1), ("batch_size", 1), ("num_workers", 0), ("val_batches", 0),
                          ("shuffle_buffer", 0), ("bpe_train_chars", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        self._check_data(self.data, "data")
        if self.val_data is not None:
            self._check_data(self.val_data, "val_data")
        if is_prepared(self.data):
            self._check_prepared()
        elif self.shuffle:
            raise ValueError("shuffle=True permutes the blocks of token shards (data= a directory made by `optlab data "
                             "prepare`); for streaming data use shuffle_buffer, or prepare the data")
        elif self.val_data is not None and is_prepared(self.val_data):
            raise ValueError(f"val_data={self.val_data!r} is prepared token shards but data={self.data!r} is text; "
                             "prepare both (with the same tokenizer) or give val_data as text shards")
        if self.tokenizer is None and not is_prepared(self.data):
            self.tokenizer = "bytes"
        if self.val_fraction is None:
            self.val_fraction = 0.0 if self.val_data is not None else 0.05
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_batches > 0 and self.val_data is None and self.val_fraction == 0.0:
            raise ValueError("val_batches > 0 but there is no validation data: set val_fraction > 0 (a hash split of "
                             "the data), give val_data, or set val_batches=0")
        if self.tokenizer == "bpe":
            if self.vocab_size < 258:
                raise ValueError(f"vocab_size must be ≥ 258 for tokenizer='bpe', got {self.vocab_size}")
        elif self.tokenizer not in ("bytes", None) and not Path(self.tokenizer).expanduser().is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer} (tokenizer must be 'bytes', 'bpe' "
                                    "or the path of a tokenizer.json)")
        if self.shard_by not in SHARD_BY:
            raise ValueError(f"shard_by must be one of {SHARD_BY}, got {self.shard_by!r}")
        if self.sources is not None and (isinstance(self.sources, str) or not self.sources):
            raise ValueError(f"sources must be a non-empty list of set names (e.g. ['RedPajamaWikipedia']) or None, "
                             f"got {self.sources!r}")

    def _check_prepared(self) -> None:
        """Settings that a prepared directory decided once, at prepare time, must not be contradicted."""
        index = load_index(self.data)
        where = f"{self.data} (prepared by: {index.get('command')})"
        if self.val_fraction is None:
            self.val_fraction = float(index["val_fraction"]) if self.val_data is None else 0.0
        elif self.val_data is None and self.val_fraction != index["val_fraction"]:
            raise ValueError(f"val_fraction={self.val_fraction} but the validation split of {where} was decided at "
                             f"prepare time with val_fraction={index['val_fraction']}: drop val_fraction, or prepare "
                             "again with --val-fraction")
        if self.sources is not None and sorted(self.sources) != (index.get("sources") or None):
            raise ValueError(f"sources={self.sources} but the source sets of {where} were chosen at prepare time "
                             f"({index.get('sources') or 'all'}): drop sources, or prepare again with --sources")
        if self.shuffle_buffer:
            raise ValueError("shuffle_buffer is for streaming data; token shards shuffle whole epochs: use shuffle=True")
        if self.tokenizer == "bpe":
            raise ValueError(f"tokenizer='bpe' trains a tokenizer, but {where} is already tokenized: drop tokenizer= "
                             "(its tokenizer.json is used)")
        if self.val_data is not None and not is_prepared(self.val_data):
            raise ValueError(f"data={self.data!r} is prepared token shards, so val_data must be too: prepare it with "
                             f"`optlab data prepare {self.val_data} --tokenizer {self.data}/tokenizer.json "
                             "--val-fraction 0 --out VAL_DIR` and pass val_data=VAL_DIR")

    def _check_data(self, data: str | list[str], field: str) -> None:
        entries = [data] if isinstance(data, str) else list(data)
        if not entries:
            raise ValueError(f"{field} is empty: give shard paths, 'embedded' or 'hub:<owner>/<name>'")
        for e in entries:
            parse_embedded(str(e))  # a misspelled embedded set is an error here
        special = [e for e in entries if parse_embedded(str(e)) is not None or str(e).startswith(HUB_PREFIX)]
        if special and len(entries) > 1:
            raise ValueError(f"{field}: {special[0]!r} cannot be combined with other entries, got {entries}")
        hub = [e for e in special if str(e).startswith(HUB_PREFIX)]
        if hub and not self.allow_download:
            raise ValueError(f"{field}={hub[0]!r} streams from the Hugging Face hub and downloads data; set "
                             "allow_download=True to opt in, or point it at local shards")


def _as_list(data: str | list[str]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


class _FixedBatches(IterableDataset):
    """The same precomputed batches on every pass (validation)."""

    def __init__(self, batches: torch.Tensor) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


class DataPipeline:
    """Readers, tokenizer, training stream and validation batches of one :class:`DataConfig`."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        #: whether ``config.data`` is a prepared token-shard directory (decided again in ``setup``)
        self.prepared = is_prepared(config.data)
        self._train_shards: TokenShards | None = None
        self._val_shards: TokenShards | None = None
        self.rank, self.world_size = 0, 1
        self._tokenizer: TextTokenizer | None = None
        self._train_reader = self._val_reader = None
        self._val: torch.Tensor | None = None

    # -- preparation (once per machine) ---------------------------------------------------------
    @property
    def embedded_dir(self) -> Path:
        return Path(self.config.work_dir).expanduser() / "embedded"

    def bpe_path(self) -> Path:
        """Where the BPE of these settings is kept: its name hashes everything the training depends on."""
        c = self.config
        key = json.dumps([c.data, c.sources, c.val_fraction, c.vocab_size, c.bpe_train_chars, c.hub_split],
                         sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return Path(c.work_dir).expanduser() / f"tokenizer-bpe{c.vocab_size}-{digest}.json"

    def prepare(self) -> None:
        """Write the embedded corpus's shards and train the BPE tokenizer, if needed (idempotent)."""
        c = self.config
        if self.prepared:
            return  # tokenized once by `optlab data prepare`: nothing to write
        for entry in _as_list(c.data) + _as_list(c.val_data or []):
            for name in parse_embedded(str(entry)) or ():
                write_embedded_shards(embedded_set_dir(Path(c.work_dir).expanduser(), name), set_name=name)
        if c.tokenizer == "bpe" and not self.bpe_path().is_file():
            texts = split_texts(self._reader(c.data), "train", c.val_fraction)
            train_bpe(self._take_chars(texts, c.bpe_train_chars), c.vocab_size).save(self.bpe_path())

    @staticmethod
    def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
        total = 0
        for text in texts:
            yield text
            total += len(text)
            if total >= limit:
                return

    # -- set-up (every process) -----------------------------------------------------------------
    def _reader(self, data: str | list[str], hub_split: str | None = None) -> ShardReader | HubReader:
        c = self.config
        entries = _as_list(data)
        sets = parse_embedded(str(entries[0]))
        if sets is not None:
            dirs = [embedded_set_dir(Path(c.work_dir).expanduser(), name) for name in sets]
            for d in dirs:
                if not d.is_dir():
                    raise FileNotFoundError(f"the embedded corpus is not written yet under {d}: "
                                            "call prepare() (LightningDataModule.prepare_data) first")
            return ShardReader(dirs, sources=c.sources)
        if entries[0].startswith(HUB_PREFIX):
            return HubReader(entries[0][len(HUB_PREFIX):], split=hub_split or c.hub_split, sources=c.sources,
                             allow_download=c.allow_download)
        return ShardReader(entries, sources=c.sources)

    def setup(self, rank: int = 0, world_size: int = 1) -> None:
        """Resolve the data paths and load the tokenizer for process ``rank`` of ``world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        c = self.config
        self.prepared = is_prepared(c.data)
        if self.prepared:
            self.rank, self.world_size = rank, world_size
            self._setup_shards()
            return
        if world_size == 1:
            self.prepare()  # single process: nothing to race with, so prepare on demand
        self.rank, self.world_size = rank, world_size
        self._train_reader = self._reader(c.data)
        # a hub val_data reads the data set's own validation split
        self._val_reader = self._reader(c.val_data, "validation") if c.val_data is not None else self._train_reader
        if c.tokenizer == "bytes":
            self._tokenizer = ByteTokenizer()
        elif c.tokenizer == "bpe":
            if not self.bpe_path().is_file():
                raise FileNotFoundError(f"trained tokenizer {self.bpe_path()} is missing: call prepare() first")
            self._tokenizer = TextTokenizer.from_file(self.bpe_path())
        else:
            self._tokenizer = TextTokenizer.from_file(Path(c.tokenizer).expanduser(), eos_token=c.eos_token)
        self._val = None

    def _setup_shards(self) -> None:
        """Open the token shards (checked before training) and their tokenizer."""
        c = self.config
        self._train_shards = TokenShards(c.data, "train")
        directory = self._train_shards.directory
        index = self._train_shards.index
        tok = TextTokenizer.from_file(directory / TOKENIZER_NAME, eos_token=index["eos_token"])
        if tok.fingerprint() != index["tokenizer_fingerprint"] or tok.vocab_size != index["vocab_size"]:
            raise ValueError(f"{directory / TOKENIZER_NAME} is not the tokenizer the shards were made with (its "
                             f"fingerprint or vocabulary differs from {directory / 'index.json'}); restore it or "
                             f"prepare again ({index.get('command')})")
        if c.tokenizer is not None:
            given = ByteTokenizer() if c.tokenizer == "bytes" else \
                TextTokenizer.from_file(Path(c.tokenizer).expanduser(), eos_token=c.eos_token)
            if given.fingerprint() != tok.fingerprint():
                raise ValueError(f"tokenizer={c.tokenizer!r} is not the tokenizer {directory} was prepared with "
                                 f"({directory / TOKENIZER_NAME}, {tok.vocab_size} ids); drop tokenizer= to use it, "
                                 "or prepare the data again with this tokenizer")
        self._tokenizer = tok
        self._val_shards = None
        if c.val_batches > 0:
            if c.val_data is not None:
                self._val_shards = TokenShards(c.val_data, "all")
                if self._val_shards.index["tokenizer_fingerprint"] != index["tokenizer_fingerprint"]:
                    raise ValueError(f"val_data {c.val_data} was prepared with another tokenizer than {directory}; "
                                     f"prepare it with --tokenizer {directory / TOKENIZER_NAME}")
            else:
                self._val_shards = TokenShards(c.data, "val")
        self._val = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            raise RuntimeError("the data pipeline is not set up: call setup() (LightningDataModule.setup) first")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def save_tokenizer(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` so evaluation can reload exactly this tokenizer."""
        return self.tokenizer.save(Path(directory) / "tokenizer.json")

    # -- streams ----------------------------------------------------------------------------------
    def train_dataset(self, batches_consumed: int = 0) -> PackedDataset | TokenShardDataset:
        """This rank's training stream, starting after ``batches_consumed`` batches."""
        c = self.config
        tok = self.tokenizer
        if self.prepared:
            return TokenShardDataset(self._train_shards, seq_len=c.seq_len, batch_size=c.batch_size, rank=self.rank,
                                     world_size=self.world_size, num_workers=c.num_workers, shuffle=c.shuffle,
                                     seed=c.seed, batches_consumed=batches_consumed)
        return PackedDataset(self._train_reader, tok, seq_len=c.seq_len, batch_size=c.batch_size, split="train",
                             val_fraction=c.val_fraction, rank=self.rank, world_size=self.world_size,
                             num_workers=c.num_workers, shard_by=c.shard_by, cycle=True,
                             shuffle_buffer=c.shuffle_buffer, seed=c.seed, batches_consumed=batches_consumed)

    def loader(self, dataset: PackedDataset | TokenShardDataset) -> DataLoader:
        """A ``DataLoader`` over ``dataset`` with the configured workers (batches come ready-made)."""
        if dataset.num_workers > 0:
            # tokenizers disables its thread pool in forked workers and warns; saying so up front is quieter
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # persistent workers change nothing for a stream that is iterated once (it never ends), but
        # spare Lightning's warning about worker start-up
        return DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=dataset.num_workers > 0)

    def validation_batches(self) -> torch.Tensor:
        """This rank's ``(val_batches, batch_size, seq_len + 1)`` validation tokens, computed once."""
        c = self.config
        if self._val is None and self.prepared:
            self._val = self._shard_validation()
        if self._val is None:
            split = "all" if c.val_data is not None else "val"
            ds = PackedDataset(self._val_reader, self.tokenizer, seq_len=c.seq_len, batch_size=c.batch_size,
                               split=split, val_fraction=c.val_fraction, rank=self.rank, world_size=self.world_size,
                               shard_by=c.shard_by, cycle=True)
            batches = list(itertools.islice(iter(ds), c.val_batches))
            empty = torch.empty(0, c.batch_size, c.seq_len + 1, dtype=torch.long)
            self._val = torch.stack(batches) if batches else empty
        return self._val

    def _shard_validation(self) -> torch.Tensor:
        c = self.config
        if self._val_shards is None:
            return torch.empty(0, c.batch_size, c.seq_len + 1, dtype=torch.long)
        ds = TokenShardDataset(self._val_shards, seq_len=c.seq_len, batch_size=c.batch_size, rank=self.rank,
                               world_size=self.world_size, cycle=False)
        n = min(c.val_batches, ds.batches_per_epoch())
        return torch.stack([ds.batch(k) for k in range(n)])

    def val_loader(self) -> DataLoader:
        return DataLoader(_FixedBatches(self.validation_batches()), batch_size=None)

    # -- position ---------------------------------------------------------------------------------
    def state_dict(self, batches_consumed: int) -> dict[str, Any]:
        """The training stream's position and what it is valid for (layout, tokenizer, data)."""
        c = self.config
        return {**self.train_dataset(batches_consumed).state_dict(), "tokenizer": self.tokenizer.fingerprint(),
                "data": json.dumps([c.data, c.sources], default=str)}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Check a saved position against these settings and return its ``batches_consumed``."""
        if state.get("reader") == "token_shards" and not self.prepared:
            raise ValueError(f"the checkpoint's data position counts blocks of prepared token shards, but this run "
                             f"streams {self.config.data!r}; resume with data= the prepared directory it was saved "
                             "with (or start the data stream afresh)")
        if state.get("tokenizer", self.tokenizer.fingerprint()) != self.tokenizer.fingerprint():
            raise ValueError("the checkpoint's data stream used a different tokenizer than this run; resume with the "
                             "same tokenizer settings and work_dir (the trained BPE is cached there)")
        c = self.config
        # token shards are identified by their content (checked by the dataset), so a moved directory is fine
        if not self.prepared and "data" in state and state["data"] != json.dumps([c.data, c.sources], default=str):
            warnings.warn(f"resuming a data stream saved for data/sources {state['data']} with {[c.data, c.sources]}: "
                          "the position is kept, but it counts batches of the old data", RuntimeWarning, stacklevel=2)
        dataset = self.train_dataset()
        dataset.load_state_dict(state)
        return dataset.batches_consumed
