"""Token shards: a prepared directory of memory-mapped token ids, read by position (plain PyTorch).

Format (written by :func:`lightning_optlab.data.prepare.prepare`, version 1)::

    DIR/index.json              what the shards hold (JSON, below)
    DIR/tokenizer.json          the tokenizer they were made with
    DIR/train-000000.bin ...    token ids, little-endian uint16 (vocabulary ≤ 65,536) or uint32
    DIR/val-000000.bin ...      the held-out split (documents with sha1(text) < val_fraction)
    DIR/prepare.journal.jsonl   the prepare's record of finished inputs (what a resume continues from)

Each ``.bin`` is the concatenation, in input order, of ``tokens(doc) + [eos_id]`` for the documents
of one input file (or one chunk of a hub stream): no header, so numpy alone reads it::

    import json, numpy as np
    index = json.load(open("DIR/index.json"))
    train = [np.memmap(f"DIR/{s['file']}", dtype=index["numpy_dtype"], mode="r")
             for s in index["splits"]["train"]["shards"]]
    stream = np.concatenate(train)          # the training token stream, documents in input order

``index.json`` holds ``format``, ``version``, ``dtype``/``numpy_dtype``, ``vocab_size``, ``eos_id``,
``eos_token``, ``tokenizer_fingerprint`` (sha1 of tokenizer.json), ``val_fraction``, ``sources``
(the source-set filter), ``inputs``, ``python`` (the CPython version when an embedded set is in
it), ``read`` (what the reader counted: documents, filtered, empty, corrupt lines, bad shards,
source sets seen), ``command`` (how to re-run the prepare) and per split ``documents``,
``tokens`` and ``shards``: ``[{"file", "input", "documents", "tokens", "sources": {set: docs}}]``.

Reading. A split is one token stream (its shards concatenated in index order) cut into
``n_blocks = tokens // (seq_len + 1)`` blocks of ``seq_len + 1`` tokens. With ``world_size``
ranks and ``batch_size`` blocks per batch, batch ``k`` of rank ``r`` holds the block positions
``p = (k * world_size + r) * batch_size + i``, ``i < batch_size``; position ``p`` is block
``perm_e(p mod n_blocks)`` of epoch ``e = p // n_blocks``, where ``perm_e`` is the identity or,
with ``shuffle``, a seeded pseudo-random permutation of the blocks (:func:`permute_blocks`,
computed per index: no table). So a batch is a pure function of ``k``: ranks and workers are
disjoint within an epoch, any ``k`` is reached in constant time, and the DataLoader's worker
count does not change the sequence.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .stream import worker_slot

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_NAME", "TOKENIZER_NAME", "JOURNAL_NAME", "token_dtype",
           "is_prepared", "load_index", "TokenShards", "TokenShardDataset", "permute_blocks"]

FORMAT = "lightning_optlab.token_shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
JOURNAL_NAME = "prepare.journal.jsonl"
_SPLITS = ("train", "val", "all")
_OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)
_PROBE = 4096  # tokens checked at each end of a shard when it is opened


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocabulary ≤ 65,536), else ``uint32``; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_prepared(path: str | Path | list) -> bool:
    """Whether ``path`` is a directory made by ``optlab data prepare`` (finished or interrupted)."""
    if not isinstance(path, (str, Path)):
        return False
    p = Path(path).expanduser()
    return p.is_dir() and ((p / INDEX_NAME).is_file() or (p / JOURNAL_NAME).is_file())


def _rerun_hint(index: dict | None) -> str:
    cmd = (index or {}).get("command")
    return f"run the prepare again ({cmd}): it rewrites missing or damaged shards" if cmd else \
        "run the same `optlab data prepare ... --out DIR` again: it rewrites missing or damaged shards"


def load_index(directory: str | Path) -> dict[str, Any]:
    """Read and check ``directory/index.json``; errors name the file and the fix."""
    d = Path(directory).expanduser()
    path = d / INDEX_NAME
    if not d.is_dir():
        raise FileNotFoundError(f"token-shard directory not found: {d}; make it with "
                                "`optlab data prepare SRC... --tokenizer T --out DIR`")
    if not path.is_file():
        if (d / JOURNAL_NAME).is_file():
            raise FileNotFoundError(f"{path} is missing: the prepare into {d} was interrupted before it finished; "
                                    "run the same `optlab data prepare` command again, it continues where it stopped")
        raise FileNotFoundError(f"{path} is missing: {d} is not a prepared token-shard directory; make it with "
                                "`optlab data prepare SRC... --tokenizer T --out DIR`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or damaged: {err}); run the same `optlab data "
                         "prepare` command again, it rebuilds the index from its journal") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a token-shard index (format {index.get('format') if isinstance(index, dict) else None!r}, "
                         f"expected {FORMAT!r}); point data= at a directory made by `optlab data prepare`")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('version')!r}; this lightning_optlab reads version "
                         f"{FORMAT_VERSION}: prepare the data again with this version")
    if np.dtype(index["numpy_dtype"]) != token_dtype(index["vocab_size"]):
        raise ValueError(f"{path}: dtype {index['numpy_dtype']} does not hold a vocabulary of {index['vocab_size']}; "
                         f"{_rerun_hint(index)}")
    return index


def index_fingerprint(index: dict[str, Any]) -> str:
    """sha1 of what the positions index into: the tokenizer and every shard's name and length (not the path)."""
    shards = {s: [(x["file"], x["tokens"]) for x in index["splits"][s]["shards"]] for s in sorted(index["splits"])}
    key = json.dumps([index["tokenizer_fingerprint"], shards], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


class TokenShards:
    """One split of a prepared directory as a single token stream, opened lazily by memory map.

    Args:
        directory: made by ``optlab data prepare``.
        split: ``"train"``, ``"val"`` or ``"all"`` (train then val shards).

    Opening checks every shard before training: it exists, its size is ``tokens`` ids of the
    index's dtype (a truncated shard fails), it ends with the end-of-document id and its first
    and last ids are inside the vocabulary (a shard of another tokenizer fails).
    """

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.directory = Path(directory).expanduser()
        self.index = load_index(self.directory)
        self.split = split
        self.dtype = np.dtype(self.index["numpy_dtype"])
        self.vocab_size, self.eos_id = int(self.index["vocab_size"]), int(self.index["eos_id"])
        names = ("train", "val") if split == "all" else (split,)
        self.shards = [s for name in names for s in self.index["splits"].get(name, {"shards": []})["shards"]]
        self.files = [self.directory / s["file"] for s in self.shards]
        lengths = np.array([int(s["tokens"]) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        for i in range(len(self.files)):
            self._check_shard(i)

    def fingerprint(self) -> str:
        return index_fingerprint(self.index)

    def _check_shard(self, i: int) -> None:
        path, want = self.files[i], int(self.shards[i]["tokens"]) * self.dtype.itemsize
        hint = _rerun_hint(self.index)
        if not path.is_file():
            raise FileNotFoundError(f"token shard {path} listed in {self.directory / INDEX_NAME} is missing; {hint}")
        size = path.stat().st_size
        if size != want:
            raise ValueError(f"token shard {path} has {size:,} bytes, its index says {want:,} "
                             f"({self.shards[i]['tokens']:,} {self.dtype.name} ids): it is truncated or another "
                             f"file; {hint}")
        data = self._map(i)
        if int(data[-1]) != self.eos_id:
            raise ValueError(f"token shard {path} does not end with the end-of-document id {self.eos_id} of "
                             f"{self.directory / TOKENIZER_NAME} (it ends with {int(data[-1])}): a shard of another "
                             f"tokenizer or a damaged file; {hint}")
        top = max(int(data[:_PROBE].max()), int(data[-_PROBE:].max()))
        if top >= self.vocab_size:
            raise ValueError(f"token shard {path} holds id {top}, outside the vocabulary of {self.vocab_size} of "
                             f"{self.directory / TOKENIZER_NAME}: a shard of another vocabulary; {hint}")

    def _map(self, i: int) -> np.memmap:
        data = self._maps.get(i)
        if data is None:
            data = np.memmap(self.files[i], dtype=self.dtype, mode="r")
            self._maps[i] = data
            if len(self._maps) > _OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return data

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Ids ``[start, stop)`` of the split's stream (across shard boundaries), as a new array."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the split's {self.n_tokens} tokens")
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            take = min(stop, hi)
            parts.append(self._map(i)[start - lo : take - lo])
            start, i = take, i + 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # memory maps are per process: reopened on use
        return state


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute_blocks(index: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded pseudo-random bijection of ``[0, n)``, evaluated at ``index`` (no table: O(1) per index).

    A 4-round Feistel network over ``2b`` bits (``2^(2b) ≥ n``) is a permutation of ``[0, 2^(2b))``;
    applying it again until the value falls below ``n`` ("cycle walking", Black & Rogaway 2002)
    restricts it to a permutation of ``[0, n)``. Each ``(seed, epoch)`` gives another permutation.
    Memory and time do not grow with ``n``, so a 300M-block epoch resumes as fast as a small one.
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = []
    state = _splitmix64((seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF))
    for _ in range(4):
        state = _splitmix64(state)
        keys.append(np.uint64(state))
    shift = np.uint64(half)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            h = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
            left, right = right, left ^ (h & mask)
        return (left << shift) | right

    x = np.asarray(index, dtype=np.uint64)
    if x.size and int(x.max()) >= n:
        raise IndexError(f"block index {int(x.max())} outside [0, {n})")
    with np.errstate(over="ignore"):
        x = feistel(x)
        todo = x >= np.uint64(n)
        while todo.any():
            x[todo] = feistel(x[todo])
            todo = x >= np.uint64(n)
    return x.astype(np.int64)


class TokenShardDataset(IterableDataset):
    """Batches of ``seq_len + 1``-token blocks read by position from :class:`TokenShards`.

    Args:
        shards: the split to read.
        seq_len: tokens per sequence; blocks hold ``seq_len + 1``.
        batch_size: blocks per batch (per rank).
        rank, world_size: this process in data-parallel training.
        num_workers: the ``DataLoader``'s workers (slot ``i`` makes batches ``k0 + i, k0 + i + W, ...``).
        shuffle: a seeded permutation of the blocks in every epoch (:func:`permute_blocks`).
        seed: seed of the permutation.
        cycle: repeat epochs forever (training) or stop after the first (validation).
        batches_consumed: where iteration starts; reached in constant time.

    Batch ``k`` is a pure function of ``k`` and the layout (see the module docstring), so a
    resume with any ``num_workers`` continues exactly; a different ``world_size``, ``batch_size``,
    ``seq_len``, shuffle or data is refused by :meth:`load_state_dict`.
    """

    def __init__(self, shards: TokenShards, *, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = False, seed: int = 0, cycle: bool = True,
                 batches_consumed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("num_workers", num_workers, 0),
                                 ("batches_consumed", batches_consumed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.seed, self.cycle = bool(shuffle), seed, cycle
        self.batches_consumed = batches_consumed
        self.block_len = seq_len + 1
        self.n_blocks = shards.n_tokens // self.block_len
        if self.n_blocks < batch_size * world_size:
            raise ValueError(f"{shards.directory} ({shards.split!r} split) holds {shards.n_tokens:,} tokens = "
                             f"{self.n_blocks} blocks of {self.block_len}, fewer than one batch of {batch_size} "
                             f"blocks for each of {world_size} ranks: use more data or a smaller batch_size/seq_len")

    # -- position ---------------------------------------------------------------------------
    def record_batches(self, n: int = 1) -> None:
        """Note that the training loop used ``n`` more batches of this dataset."""
        self.batches_consumed += n

    def layout(self) -> dict[str, Any]:
        """What a saved position is valid for (``num_workers`` is not part of it: batches do not depend on it)."""
        return {"reader": "token_shards", "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "split": self.shards.split, "shuffle": self.shuffle, "seed": self.seed,
                "shards": self.shards.fingerprint()}

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "num_workers": self.num_workers, **self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["batches_consumed"]``; a changed layout is an error naming what changed."""
        if state.get("reader") != "token_shards":
            raise ValueError(f"the checkpoint's data position counts batches of the streaming reader, this run reads "
                             f"the token shards in {self.shards.directory}; resume with the data it was saved with "
                             "(or start the data stream afresh)")
        mismatched = {k: (state.get(k), v) for k, v in self.layout().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            fix = ("the shards are not the ones the checkpoint read: point data= at that prepared directory"
                   if "shards" in mismatched else "restore the saved settings")
            raise ValueError(f"cannot resume the token-shard stream of {self.shards.directory} exactly, its layout "
                             f"changed ({details}); {fix}, or start the data stream afresh")
        self.batches_consumed = int(state["batches_consumed"])

    # -- batches ------------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        """Whole batches of this rank in one pass over the blocks (the length without ``cycle``)."""
        return self.n_blocks // (self.batch_size * self.world_size)

    def block_ids(self, k: int) -> np.ndarray:
        """The block indices of this rank's batch ``k``."""
        p = (k * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch, within = np.divmod(p, self.n_blocks)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            sel = epoch == e
            out[sel] = permute_blocks(within[sel], self.n_blocks, self.seed, int(e))
        return out

    def batch(self, k: int) -> torch.Tensor:
        """This rank's batch ``k`` as a ``(batch_size, seq_len + 1)`` LongTensor."""
        L = self.block_len
        rows = [self.shards.tokens(int(b) * L, int(b) * L + L) for b in self.block_ids(k)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot = worker_slot("TokenShardDataset", self.num_workers)
        step = max(1, self.num_workers)
        k = self.batches_consumed + slot
        end = None if self.cycle else self.batches_per_epoch()
        while end is None or k < end:
            yield self.batch(k)
            k += step
