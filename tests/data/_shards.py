"""Helpers shared by the data tests: small shard files written on the spot."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import zstandard

WORDS = ("the optimizer step moves each weight along its preconditioned gradient while the schedule "
         "warms up and decays the learning rate over tokens seen by the model").split()


def make_docs(n: int, seed: int = 0, sets: tuple[str, ...] = ("RedPajamaWikipedia", "RedPajamaBook")) -> list[dict]:
    """``n`` distinct SlimPajama records of 5-60 words, set names alternating."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        docs.append({"text": f"Document {i}: {words}.", "meta": {"redpajama_set_name": sets[i % len(sets)]}})
    return docs


def lines_of(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def write_plain(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lines_of(records))
    return path


def write_zst(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines_of(records)))
    return path


def write_gz(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(lines_of(records))
    return path


def write_corpus(root: Path, docs: list[dict], n_shards: int = 3) -> Path:
    """``docs`` as ``n_shards`` zstd shards, contiguous, under ``root``."""
    for i in range(n_shards):
        write_zst(root / f"part_{i}.jsonl.zst", docs[i * len(docs) // n_shards : (i + 1) * len(docs) // n_shards])
    return root
