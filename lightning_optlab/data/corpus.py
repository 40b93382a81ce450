"""The embedded default corpus, and writing documents as SlimPajama-format shards.

The corpus is CPython's own reference documentation, ``pydoc_data.topics`` (what ``help()``
shows for keywords and topics): 79 English documents, about 465k characters of real
natural-language text with some code, shipped with every Python, so nothing is downloaded.
:func:`write_embedded_shards` writes it in SlimPajama's layout and format
(``train/chunk1/example_train_<i>.jsonl.zst``, one ``{"text", "meta": {"redpajama_set_name"}}``
per line) so the demo reads it through the same reader as a real SlimPajama download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["EMBEDDED_SET_NAME", "embedded_corpus", "write_shards", "write_embedded_shards"]

#: the ``meta.redpajama_set_name`` of the embedded documents
EMBEDDED_SET_NAME = "CPythonDocs"


def embedded_corpus() -> list[tuple[str, str]]:
    """``(title, text)`` of CPython's bundled reference documentation, sorted by title."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _write_jsonl(path: Path, records: Iterable[Mapping], compress: bool) -> None:
    """Write one shard atomically (to a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
    if compress:
        import zstandard

        payload = zstandard.ZstdCompressor(level=10).compress(payload)
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_shards(records: list[Mapping], out_dir: str | Path, *, n_shards: int = 4,
                 stem: str = "example_train_", compress: bool = True) -> list[Path]:
    """Write ``records`` (dicts with ``text`` and ``meta``) as ``n_shards`` shards, contiguous and in order.

    Shard ``i`` is ``out_dir/<stem><i>.jsonl.zst`` (``.jsonl`` without compression) and holds
    records ``[i*n//k, (i+1)*n//k)``, so reading the shards in order gives ``records`` back.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be ≥ 1, got {n_shards}")
    out = Path(out_dir)
    suffix = ".jsonl.zst" if compress else ".jsonl"
    paths = []
    for i in range(n_shards):
        part = records[i * len(records) // n_shards : (i + 1) * len(records) // n_shards]
        path = out / f"{stem}{i}{suffix}"
        _write_jsonl(path, part, compress)
        paths.append(path)
    return paths


def write_embedded_shards(out_dir: str | Path, *, n_shards: int = 4) -> list[Path]:
    """Write the embedded corpus as SlimPajama shards under ``out_dir/train/chunk1`` (kept if present).

    Returns the shard paths; pass ``out_dir`` (a directory is read recursively) to the reader.
    """
    chunk = Path(out_dir) / "train" / "chunk1"
    expected = [chunk / f"example_train_{i}.jsonl.zst" for i in range(n_shards)]
    present = sorted(chunk.glob("example_train_*.jsonl.zst")) if chunk.is_dir() else []
    if present and set(present) != set(expected):
        raise ValueError(f"{chunk} holds shards {[p.name for p in present]} that are not the {n_shards} this call "
                         "writes; reading the folder would mix both: use an empty out_dir")
    if present:  # every shard is written atomically, so present means complete
        return expected
    records = [{"text": text, "meta": {"redpajama_set_name": EMBEDDED_SET_NAME, "title": title}}
               for title, text in embedded_corpus()]
    return write_shards(records, chunk, n_shards=n_shards)
