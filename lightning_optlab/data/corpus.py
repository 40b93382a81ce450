"""The embedded corpora, and writing documents as SlimPajama-format shards.

Two source sets ship with every CPython, so nothing is downloaded; they are named like
SlimPajama's sets (``meta.redpajama_set_name``), so ``sources=`` filtering works on them:

* ``CPythonDocs`` (the default): CPython's reference documentation, ``pydoc_data.topics`` (what
  ``help()`` shows for keywords and topics): 79 English documents, about 465k characters of
  natural-language text with some code.
* ``CPythonSource``: the standard library's own sources, every non-test ``.py`` file of the running
  CPython's stdlib (about 730 files, 12 MB on 3.11), one document per file in sorted path order.
  Its content depends on the Python version (recorded in every record's ``meta.python`` and in a
  prepared index), so its shards are written under a folder named after the version.

:func:`write_embedded_shards` writes them in SlimPajama's layout and format
(``train/chunk1/example_train_<i>.jsonl.zst``, one ``{"text", "meta": {"redpajama_set_name"}}``
per line) so they are read through the same reader as a real SlimPajama download.
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
import tokenize
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["EMBEDDED_SET_NAME", "SOURCE_SET_NAME", "EMBEDDED_SETS", "embedded_corpus", "stdlib_sources",
           "embedded_records", "parse_embedded", "write_shards", "write_embedded_shards", "embedded_set_dir"]

#: the ``meta.redpajama_set_name`` of the embedded documentation (the default embedded corpus)
EMBEDDED_SET_NAME = "CPythonDocs"
#: the ``meta.redpajama_set_name`` of the standard library's sources
SOURCE_SET_NAME = "CPythonSource"
#: every embedded source set, the default first
EMBEDDED_SETS = (EMBEDDED_SET_NAME, SOURCE_SET_NAME)
#: shards each set is written as (the sources are split finer, so a parallel prepare has work for 16 workers)
_SET_SHARDS = {EMBEDDED_SET_NAME: 4, SOURCE_SET_NAME: 16}
# folders of the stdlib that hold tests or machine-specific build files, not library code
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})


def embedded_corpus() -> list[tuple[str, str]]:
    """``(title, text)`` of CPython's bundled reference documentation, sorted by title."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _is_library_source(rel: Path) -> bool:
    if set(rel.parts[:-1]) & _SKIP_DIRS or rel.parts[0].startswith("config-"):
        return False
    name = rel.name
    # test modules, and the build-configuration dump whose content is the machine's, not the library's
    return not (name.startswith("test_") or name.startswith("_sysconfigdata"))


def stdlib_sources(root: str | Path | None = None) -> list[tuple[str, str]]:
    """``(relative path, text)`` of every non-test ``.py`` file of the standard library, sorted by path.

    ``root`` defaults to the running CPython's ``sysconfig.get_path("stdlib")``. Files are decoded
    with their declared source encoding (PEP 263, as Python itself reads them).
    """
    base = Path(root if root is not None else sysconfig.get_path("stdlib"))
    if not base.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {base}")
    out = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if not path.is_file() or not _is_library_source(rel):
            continue
        with open(path, "rb") as fh:
            encoding, _ = tokenize.detect_encoding(fh.readline)
        out.append((rel.as_posix(), path.read_bytes().decode(encoding, errors="replace")))
    out.sort()
    if not out:
        raise FileNotFoundError(f"no library .py files under {base}")
    return out


def embedded_records(set_name: str) -> list[dict]:
    """The SlimPajama-shaped records (``text``, ``meta``) of one embedded source set, in a fixed order."""
    if set_name == EMBEDDED_SET_NAME:
        return [{"text": text, "meta": {"redpajama_set_name": set_name, "title": title}}
                for title, text in embedded_corpus()]
    if set_name == SOURCE_SET_NAME:
        version = platform.python_version()
        return [{"text": text, "meta": {"redpajama_set_name": set_name, "path": rel, "python": version}}
                for rel, text in stdlib_sources()]
    raise ValueError(f"unknown embedded source set {set_name!r}; choose from {list(EMBEDDED_SETS)}")


def parse_embedded(entry: str) -> tuple[str, ...] | None:
    """The embedded sets a data entry names, or ``None`` for any other entry.

    ``"embedded"`` is the documentation (the default corpus); ``"embedded:all"`` both sets;
    ``"embedded:CPythonSource"`` or ``"embedded:CPythonDocs,CPythonSource"`` the sets listed.
    """
    if entry == "embedded":
        return (EMBEDDED_SET_NAME,)
    if not entry.startswith("embedded:"):
        return None
    names = entry[len("embedded:"):]
    chosen = EMBEDDED_SETS if names == "all" else tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in chosen if n not in EMBEDDED_SETS]
    if unknown or not chosen:
        raise ValueError(f"{entry!r}: unknown embedded source set(s) {unknown}; use 'embedded', 'embedded:all' or "
                         f"'embedded:' with a comma-separated choice of {list(EMBEDDED_SETS)}")
    return chosen


def embedded_set_dir(work_dir: str | Path, set_name: str) -> Path:
    """Where :func:`write_embedded_shards` keeps ``set_name`` under ``work_dir``.

    The documentation stays in ``work_dir/embedded`` (as before); the sources go to
    ``work_dir/embedded-CPythonSource-<python version>``, since their text is the version's.
    """
    if set_name == EMBEDDED_SET_NAME:
        return Path(work_dir) / "embedded"
    if set_name == SOURCE_SET_NAME:
        return Path(work_dir) / f"embedded-{SOURCE_SET_NAME}-{platform.python_version()}"
    raise ValueError(f"unknown embedded source set {set_name!r}; choose from {list(EMBEDDED_SETS)}")


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


def write_embedded_shards(out_dir: str | Path, *, n_shards: int | None = None,
                          set_name: str = EMBEDDED_SET_NAME) -> list[Path]:
    """Write one embedded source set as SlimPajama shards under ``out_dir/train/chunk1`` (kept if present).

    ``set_name`` is ``"CPythonDocs"`` (default, 4 shards) or ``"CPythonSource"`` (16 shards);
    ``n_shards`` overrides the count. Returns the shard paths; pass ``out_dir`` (a directory is
    read recursively) to the reader.
    """
    if set_name not in _SET_SHARDS:
        raise ValueError(f"unknown embedded source set {set_name!r}; choose from {list(EMBEDDED_SETS)}")
    n_shards = _SET_SHARDS[set_name] if n_shards is None else n_shards
    chunk = Path(out_dir) / "train" / "chunk1"
    expected = [chunk / f"example_train_{i}.jsonl.zst" for i in range(n_shards)]
    present = sorted(chunk.glob("example_train_*.jsonl.zst")) if chunk.is_dir() else []
    if present and set(present) != set(expected):
        raise ValueError(f"{chunk} holds shards {[p.name for p in present]} that are not the {n_shards} this call "
                         "writes; reading the folder would mix both: use an empty out_dir")
    if present:  # every shard is written atomically, so present means complete
        return expected
    return write_shards(embedded_records(set_name), chunk, n_shards=n_shards)
