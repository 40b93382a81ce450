"""Packing token streams into fixed-length blocks, the hash split, and the block shuffle buffer.

Packing (as in GPT-2/3 pre-training): documents are concatenated, each followed by the
end-of-document token, and the stream is cut into consecutive blocks of ``block_len`` tokens,
so a document may start in one block and end in the next::

    doc A = a1 a2 a3, doc B = b1 b2, block_len 4  ->  [a1 a2 a3 EOS] [b1 b2 EOS ...]

A language-model block holds ``seq_len + 1`` tokens: inputs ``block[:-1]`` and targets
``block[1:]`` share it, and no token is repeated between blocks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["pack_blocks", "document_hash", "in_validation", "shuffle_blocks"]


def pack_blocks(docs: Iterable[Sequence[int]], block_len: int, eos_id: int) -> Iterator[list[int]]:
    """Concatenate ``doc + [eos_id]`` for each document and yield consecutive ``block_len`` blocks.

    A final partial block (fewer than ``block_len`` tokens left when ``docs`` ends) is dropped.
    """
    if block_len < 1:
        raise ValueError(f"block_len must be ≥ 1, got {block_len}")
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(eos_id)
        if len(buf) >= block_len:
            full = len(buf) - len(buf) % block_len
            for start in range(0, full, block_len):
                yield buf[start : start + block_len]
            buf = buf[full:]


def document_hash(text: str) -> float:
    """A uniform number in ``[0, 1)`` from the sha1 of the document's UTF-8 text (60 bits of it)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16) / float(16**15)


def in_validation(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: ``document_hash(text) < fraction``.

    The split depends on the text alone, so it is the same on every rank, worker and run, and
    duplicate documents always land on the same side.
    """
    return fraction > 0.0 and document_hash(text) < fraction


def shuffle_blocks(blocks: Iterable[list[int]], buffer_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Streaming shuffle: hold ``buffer_size`` blocks, emit a random one as each new block arrives.

    With ``buffer_size`` ≤ 1 the order is unchanged. Deterministic for a seeded ``rng``.
    """
    if buffer_size <= 1:
        yield from blocks
        return
    buf: list[list[int]] = []
    for block in blocks:
        if len(buf) < buffer_size:
            buf.append(block)
            continue
        j = rng.randrange(buffer_size)
        yield buf[j]
        buf[j] = block
    rng.shuffle(buf)
    yield from buf
