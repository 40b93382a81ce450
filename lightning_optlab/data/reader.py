"""Streaming reader of SlimPajama- and C4-format shards (plain Python, no Lightning).

One JSON object per line, with the document in ``text``; SlimPajama adds the source set in
``meta.redpajama_set_name`` (``"RedPajamaWikipedia"``, ``"RedPajamaC4"``, ...). Shards are
``.jsonl``/``.json`` (plain), ``.jsonl.zst`` (zstandard; SlimPajama-627B) or ``.json.gz``/``.jsonl.gz``
(gzip; C4's ``c4-train.00000-of-01024.json.gz``). Files are decompressed chunk by chunk and split
into lines on the fly, so a shard is never held in memory whole.

A line that is not a JSON object with a string ``text`` is counted in :class:`ReadStats` and
skipped with a warning naming the file and line; a shard that cannot be decompressed (not zstd,
truncated, bad gzip) is counted and the rest of it skipped, with a warning naming the file and
the line reached. Every file is read in a deterministic order (paths as given; inside a
directory, recursively in natural sort order, so ``chunk2`` comes before ``chunk10``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SHARD_SUFFIXES", "Document", "ReadStats", "ShardReader", "resolve_paths", "document_from_record"]

#: file name endings the reader understands
SHARD_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")

_CHUNK = 1 << 20  # bytes read from disk at a time


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its text, source set (``None`` when the record has none) and where it was read."""

    text: str
    source: str | None
    path: str
    line: int


@dataclass
class ReadStats:
    """What a reader saw: documents yielded, lines skipped and why."""

    files: int = 0
    documents: int = 0
    #: documents dropped by the source-set filter
    filtered: int = 0
    #: documents with an empty ``text``
    empty: int = 0
    corrupt_lines: int = 0
    bad_shards: int = 0
    #: documents seen per source set (before filtering), to explain an empty filter result
    sources_seen: Counter = field(default_factory=Counter)


def _natural_key(path: Path) -> list:
    # re.split with a capture group alternates text, number, text, ... so types line up by position
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _is_shard(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIXES) and not path.name.startswith(".")


def _expand_directory(directory: Path) -> list[Path]:
    found = [p for p in directory.rglob("*") if _is_shard(p)]
    broken = sorted((p for p in found if p.is_symlink() and not p.exists()), key=_natural_key)
    if broken:  # a link to a shard that is gone: say so rather than train on less data
        warnings.warn(f"{len(broken)} shard link(s) under {directory} point to nothing and are skipped "
                      f"(first: {broken[0]} -> {os.readlink(broken[0])}); fix or remove them", UserWarning,
                      stacklevel=3)
    files = sorted((p for p in found if p.is_file()), key=_natural_key)
    if not files:
        raise FileNotFoundError(f"no shard files ({', '.join(SHARD_SUFFIXES)}) under directory {directory}")
    return files


def resolve_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by ``paths``: files, directories (recursive) or glob patterns, in a fixed order.

    Raises ``FileNotFoundError`` naming a path that does not exist, a directory without shards or
    a pattern that matches nothing, and ``ValueError`` for a file of an unknown format.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no data paths given: pass files, directories or glob patterns of shards")
    out: list[Path] = []
    for entry in paths:
        text = str(entry)
        if any(ch in text for ch in "*?["):
            matches = sorted((Path(m) for m in glob.glob(text, recursive=True)), key=_natural_key)
            if not matches:
                raise FileNotFoundError(f"the pattern {text!r} matches no files")
            for m in matches:
                out.extend(_expand_directory(m) if m.is_dir() else [m] if _is_shard(m) else [])
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            out.extend(_expand_directory(path))
        elif path.is_file():
            if not _is_shard(path):
                raise ValueError(f"{path}: unknown shard format; expected a name ending in {', '.join(SHARD_SUFFIXES)}")
            out.append(path)
        else:
            raise FileNotFoundError(f"data path does not exist: {path}")
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _zstd_chunks(fh) -> Iterator[bytes]:  # noqa: ANN001
    """Decompressed chunks of a (possibly multi-frame) zstd stream; a truncated frame raises EOFError."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    while raw := fh.read(_CHUNK):
        while raw:
            out = dobj.decompress(raw)
            fed = True
            if out:
                yield out
            if dobj.eof:  # frame finished: anything left belongs to the next frame
                raw, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
            else:
                raw = b""
    if fed and not dobj.eof:
        raise EOFError("zstd stream ended inside a frame (truncated file)")


def _raw_chunks(path: Path) -> Iterator[bytes]:
    name = path.name
    if name.endswith(".zst"):
        with open(path, "rb") as fh:
            yield from _zstd_chunks(fh)
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
    else:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a stream of byte chunks into lines (without the newline), carrying partial lines over."""
    pending: list[bytes] = []  # pieces of a line longer than a chunk, joined once it ends
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        parts = chunk.split(b"\n")
        if pending:
            parts[0] = b"".join(pending) + parts[0]
        pending = [parts.pop()]
        yield from parts
    tail = b"".join(pending)
    if tail:
        yield tail


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def document_from_record(record: object, path: str, line: int) -> Document | None:
    """The :class:`Document` of one parsed JSON record, or ``None`` when it has no string ``text``.

    JSON may escape lone UTF-16 surrogates (``"\\ud83d"``, half an emoji cut by a crawler), which
    no UTF-8 encoder or tokenizer accepts: each becomes U+FFFD, the replacement character, so the
    rest of the document is kept.
    """
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return None
    text = record["text"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _LONE_SURROGATE.sub("\ufffd", text)
    meta = record.get("meta")
    source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return Document(text=text, source=source if isinstance(source, str) else None, path=path, line=line)


class ShardReader:
    """Iterate the documents of SlimPajama/C4 shards, streaming, in a deterministic order.

    Args:
        paths: files, directories (searched recursively) or glob patterns.
        sources: keep only documents whose ``meta.redpajama_set_name`` is one of these
            (``None`` keeps everything, including records without a set name).
        max_warnings: problems warned about individually; later ones are only counted.
        quiet: count problems without warning (for the copies that re-read what another stream reports).

    Example::

        reader = ShardReader("SlimPajama-627B/train/chunk1", sources=["RedPajamaWikipedia"])
        for doc in reader:
            ...
        print(reader.stats.corrupt_lines)

    ``stats`` accumulates over every iteration of this reader in this process.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], *, sources: Sequence[str] | None = None,
                 max_warnings: int = 20, quiet: bool = False, _files: list[Path] | None = None) -> None:
        if max_warnings < 0:
            raise ValueError(f"max_warnings must be ≥ 0, got {max_warnings}")
        if sources is not None and (isinstance(sources, str) or not all(isinstance(s, str) for s in sources)):
            raise ValueError(f"sources must be a list of set names such as ['RedPajamaWikipedia'], got {sources!r}")
        self.files = list(_files) if _files is not None else resolve_paths(paths)
        self.sources = frozenset(sources) if sources is not None else None
        self.max_warnings = max_warnings
        self.quiet = quiet
        self.stats = ReadStats()
        self._warned = 0

    def subset(self, files: Sequence[Path], *, quiet: bool = False) -> ShardReader:
        """A reader with the same settings over some of this reader's files (``quiet``: count, never warn)."""
        return ShardReader((), sources=self.sources, max_warnings=self.max_warnings, quiet=quiet, _files=list(files))

    def _warn(self, message: str) -> None:
        if self.quiet:
            return
        self._warned += 1
        if self._warned <= self.max_warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        elif self._warned == self.max_warnings + 1:
            warnings.warn("further unreadable lines/shards are counted in ShardReader.stats but not reported",
                          RuntimeWarning, stacklevel=3)

    def _keep(self, doc: Document) -> bool:
        self.stats.sources_seen[doc.source] += 1
        if self.sources is not None and doc.source not in self.sources:
            self.stats.filtered += 1
            return False
        if not doc.text:
            self.stats.empty += 1
            return False
        return True

    def read_file(self, path: Path) -> Iterator[Document]:
        """The documents of one shard, skipping (and counting) corrupt lines and undecodable data."""
        self.stats.files += 1
        lineno = 0
        try:
            for lineno, raw in enumerate(_lines(_raw_chunks(path)), start=1):
                if not raw.strip():
                    continue
                try:
                    doc = document_from_record(json.loads(raw), str(path), lineno)
                    problem = None if doc is not None else "no string 'text' field"
                except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError
                    doc, problem = None, f"invalid JSON: {err}"
                if doc is None:
                    self.stats.corrupt_lines += 1
                    self._warn(f"{path}: line {lineno}: skipped corrupt record ({problem})")
                elif self._keep(doc):
                    self.stats.documents += 1
                    yield doc
        except (OSError, EOFError, zlib.error, _zstd_error()) as err:
            self.stats.bad_shards += 1
            self._warn(f"{path}: line {lineno + 1}: undecodable shard ({type(err).__name__}: {err}); "
                       "skipped the rest of this file")

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            yield from self.read_file(path)


def _zstd_error() -> type[BaseException]:
    try:
        import zstandard
    except ImportError:  # no zstd shards can have been opened then
        return OSError
    return zstandard.ZstdError
