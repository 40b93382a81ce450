"""``PackedDataset``: the sharded, resumable stream of token batches (plain PyTorch).

Layout. With ``world_size`` ranks and ``W = max(1, num_workers)`` dataloader workers per rank
there are ``S = world_size * W`` *streams*; rank ``r`` owns streams ``r*W .. r*W + W-1``. Each
stream is an independent, deterministic sequence of batches:

1. documents of the reader, in file order, kept if they belong to the split (the held-out
   split is ``document_hash(text) < val_fraction``, see :mod:`.packing`);
2. stream ``s`` takes every ``S``-th of those documents starting at ``s`` (``shard_by="document"``)
   or the files ``s, s+S, ...`` (``shard_by="file"``; ``"auto"`` picks files when there are at
   least 8 per stream, so no stream reads what it then throws away);
3. tokenized, packed into blocks of ``seq_len + 1`` tokens with ``<|endoftext|>`` after every
   document, optionally shuffled through a seeded buffer, and grouped into ``(batch_size,
   seq_len + 1)`` LongTensors; with ``cycle=True`` the stream starts the next epoch where the
   last ended (packing runs on across the epoch boundary), forever.

No two streams share a document, so ranks and workers never overlap, and together they cover
every document of the split.

Resume. A ``DataLoader`` over an ``IterableDataset`` takes batch ``j`` from worker slot
``j mod W``. The dataset is told how many batches the training loop has consumed (``k``, the only
state; see :meth:`PackedDataset.state_dict`); a fresh loader then needs batch ``k`` next, so
worker slot ``i`` plays stream ``w = (i + k) mod W`` of its rank and first skips that stream's
``ceil((k - w) / W)`` batches it had already delivered. The continued sequence equals the
uninterrupted one batch for batch. Skipping re-reads and re-tokenizes the skipped documents
(nothing else is needed in the checkpoint, at the price of time proportional to the data
consumed); the layout (``world_size``, ``num_workers``, ``batch_size``, ``seq_len``) must match
for the position to be exact.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .packing import in_validation, pack_blocks, shuffle_blocks
from .reader import Document
from .tokenizer import TextTokenizer

__all__ = ["PackedDataset", "batches_before", "split_texts"]

SPLITS = ("train", "val", "all")
SHARD_BY = ("auto", "document", "file")
_FILES_PER_STREAM_FOR_AUTO = 8


class DocumentReader(Protocol):
    """What the dataset needs from a reader (:class:`ShardReader`, :class:`HubReader`)."""

    files: list

    def __iter__(self) -> Iterator[Document]: ...

    def subset(self, files: list, *, quiet: bool = False) -> DocumentReader: ...


def split_texts(docs: Iterable[Document], split: str, val_fraction: float) -> Iterator[str]:
    """Texts of ``docs`` in ``split``: ``"val"`` keeps the held-out hash split, ``"train"`` the rest, ``"all"`` all."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    texts = (d.text for d in docs)
    if split == "all":
        return texts
    want_val = split == "val"
    return (t for t in texts if in_validation(t, val_fraction) == want_val)


def batches_before(k: int, w: int, n: int) -> int:
    """How many of the batches ``0..k-1`` belong to stream ``w`` of ``n`` (those with ``j mod n == w``)."""
    return 0 if k <= w else (k - w + n - 1) // n



def worker_slot(dataset: str, num_workers: int) -> int:
    """This DataLoader worker's index (0 in the main process), after checking that the loader runs the
    ``num_workers`` the dataset was built for (its batches are split by that count)."""
    info = get_worker_info()
    loader_workers, slot = (info.num_workers, info.id) if info is not None else (0, 0)
    if loader_workers != num_workers:
        raise ValueError(f"{dataset} was built for num_workers={num_workers} but the DataLoader runs "
                         f"{loader_workers}; build both with the same value")
    return slot

class PackedDataset(IterableDataset):
    """Batches of packed token blocks, sharded over ranks and workers, resumable by batch count.

    Args:
        reader: the documents (a :class:`ShardReader` or :class:`HubReader`).
        tokenizer: a :class:`TextTokenizer`.
        seq_len: tokens per training sequence; blocks hold ``seq_len + 1``.
        batch_size: blocks per yielded batch.
        split: ``"train"`` (documents outside the held-out split), ``"val"`` (inside) or ``"all"``.
        val_fraction: size of the held-out split, in ``[0, 1)``.
        rank, world_size: this process in data-parallel training.
        num_workers: the ``num_workers`` of the ``DataLoader`` that will iterate this dataset.
        shard_by: ``"document"``, ``"file"`` or ``"auto"`` (see the module docstring).
        cycle: repeat the data forever (training) or stop after one pass.
        shuffle_buffer: blocks held by the streaming shuffle (0: keep the order).
        seed: seed of the shuffle (each stream draws from its own generator).
        batches_consumed: where iteration starts: the number of batches already used.

    Iterate it through ``DataLoader(ds, batch_size=None, num_workers=num_workers)``; call
    :meth:`record_batches` for every batch the training loop uses so that :meth:`state_dict`
    holds the position.
    """

    def __init__(self, reader: DocumentReader, tokenizer: TextTokenizer, *, seq_len: int, batch_size: int,
                 split: str = "train", val_fraction: float = 0.0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shard_by: str = "auto", cycle: bool = True, shuffle_buffer: int = 0,
                 seed: int = 0, batches_consumed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0),
                                 ("batches_consumed", batches_consumed, 0)):
            if value < low:
                raise ValueError(f"{name} must be ≥ {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split == "val" and val_fraction == 0.0:
            raise ValueError("split='val' with val_fraction=0 holds no documents: set val_fraction > 0")
        if shard_by not in SHARD_BY:
            raise ValueError(f"shard_by must be one of {SHARD_BY}, got {shard_by!r}")
        n_streams = world_size * max(1, num_workers)
        if shard_by == "file" and len(reader.files) < n_streams:
            raise ValueError(f"shard_by='file' needs at least one file per stream: {len(reader.files)} files for "
                             f"{world_size} ranks x {max(1, num_workers)} workers; use shard_by='document'")
        self.reader, self.tokenizer = reader, tokenizer
        self.seq_len, self.batch_size, self.split, self.val_fraction = seq_len, batch_size, split, val_fraction
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.by_file = shard_by == "file" or (
            shard_by == "auto" and len(reader.files) >= _FILES_PER_STREAM_FOR_AUTO * n_streams)
        self.cycle, self.shuffle_buffer, self.seed = cycle, shuffle_buffer, seed
        self.batches_consumed = batches_consumed

    @property
    def n_streams(self) -> int:
        return self.world_size * max(1, self.num_workers)

    # -- position ---------------------------------------------------------------------------
    def record_batches(self, n: int = 1) -> None:
        """Note that the training loop used ``n`` more batches of this dataset."""
        self.batches_consumed += n

    def state_dict(self) -> dict[str, Any]:
        """The position (batches consumed by this rank) and the layout it is valid for."""
        return {"batches_consumed": self.batches_consumed, **self.layout()}

    def layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "split": self.split, "val_fraction": self.val_fraction,
                "shuffle_buffer": self.shuffle_buffer, "seed": self.seed, "by_file": self.by_file}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["batches_consumed"]``; a changed layout is an error (the position would be wrong)."""
        mismatched = {k: (state[k], v) for k, v in self.layout().items() if k in state and state[k] != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume the data stream exactly, its layout changed ({details}); "
                             "restore the saved settings or start the data stream afresh")
        self.batches_consumed = int(state["batches_consumed"])

    # -- the streams ------------------------------------------------------------------------
    def _stream_reader(self, stream: int) -> DocumentReader:
        if self.by_file:
            return self.reader.subset(self.reader.files[stream :: self.n_streams])
        # every stream reads every file: only stream 0 warns about unreadable lines
        return self.reader if stream == 0 else self.reader.subset(self.reader.files, quiet=True)

    def stream_texts(self, stream: int, reader: DocumentReader | None = None) -> Iterator[str]:
        """One pass over the documents of ``stream``, in order."""
        n = self.n_streams
        texts = split_texts(reader or self._stream_reader(stream), self.split, self.val_fraction)
        if not self.by_file:
            texts = (t for i, t in enumerate(texts) if i % n == stream)
        return texts

    def _epochs(self, stream: int) -> Iterator[str]:
        while True:
            reader, count = self._stream_reader(stream), 0
            for text in self.stream_texts(stream, reader):
                count += 1
                yield text
            if count == 0:
                seen = dict(reader.stats.sources_seen) if hasattr(reader, "stats") else {}
                stats = getattr(reader, "stats", None)
                if stats is not None and stats.documents == 0 and (stats.corrupt_lines or stats.bad_shards
                                                                   or stats.empty):
                    what = "validation data (val_data)" if self.split == "all" else f"{self.split!r} data"
                    raise RuntimeError(
                        f"the {what} has no usable document: {stats.files} file(s) read, {stats.corrupt_lines} "
                        f"corrupt line(s), {stats.bad_shards} unreadable shard(s), {stats.empty} empty text(s) "
                        f"(files: {', '.join(str(p) for p in getattr(reader, 'files', [])[:3]) or '?'}); "
                        "fix or replace those files")
                raise RuntimeError(
                    f"data stream {stream} of {self.n_streams} ({self.world_size} ranks x {max(1, self.num_workers)} "
                    f"workers) has no {self.split!r} documents: use more data, fewer workers or ranks, "
                    f"shard_by='document', or check val_fraction and the sources filter (source sets seen: {seen})")
            if not self.cycle:
                return

    def blocks(self, stream: int) -> Iterator[list[int]]:
        """The blocks of ``seq_len + 1`` tokens of ``stream`` from its beginning."""
        tokens = (self.tokenizer.encode(t) for t in self._epochs(stream))
        blocks = pack_blocks(tokens, self.seq_len + 1, self.tokenizer.eos_id)
        rng = random.Random(self.seed * 1_000_003 + stream)
        return shuffle_blocks(blocks, self.shuffle_buffer, rng)

    def batches(self, stream: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """``(batch_size, seq_len + 1)`` LongTensors of ``stream``, after skipping ``skip`` batches."""
        blocks = itertools.islice(self.blocks(stream), skip * self.batch_size, None)
        while True:
            chunk = list(itertools.islice(blocks, self.batch_size))
            if len(chunk) < self.batch_size:  # the end of a finite stream: a partial batch is dropped
                return
            yield torch.tensor(chunk, dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot = worker_slot("PackedDataset", self.num_workers)
        n = max(1, self.num_workers)
        k = self.batches_consumed
        w = (slot + k) % n  # this slot must deliver batch k + slot next, which belongs to stream w
        return self.batches(self.rank * n + w, skip=batches_before(k, w, n))
