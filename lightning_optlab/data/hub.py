"""Opt-in streaming of SlimPajama (or another text data set) from the Hugging Face hub.

This is the one place where the pack may download data, and only when asked:
``HubReader(..., allow_download=True)`` (``DataConfig(data="hub:cerebras/SlimPajama-627B",
allow_download=True)``). It calls ``datasets.load_dataset(name, split=..., streaming=True)``, so
records arrive over the network one by one and nothing is stored whole; each record is read like a
line of a local shard (``text`` and ``meta.redpajama_set_name``). Sharding over ranks and workers
is by document index (every stream walks the hub stream and keeps its share).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .reader import Document, ReadStats, document_from_record

__all__ = ["HUB_PREFIX", "SLIMPAJAMA_HUB_NAME", "HubReader"]

#: ``data`` values starting with this name a hub data set
HUB_PREFIX = "hub:"
SLIMPAJAMA_HUB_NAME = "cerebras/SlimPajama-627B"


class HubReader:
    """Documents streamed from the hub with ``datasets.load_dataset(..., streaming=True)``.

    Args:
        name: the hub data set (default SlimPajama-627B).
        split: its split (``"train"``, ``"validation"``, ``"test"``).
        sources: keep only these ``meta.redpajama_set_name`` values (``None``: all).
        allow_download: must be ``True``: streaming from the hub uses the network.
        load_kwargs: further keyword arguments for ``load_dataset`` (``revision``, ``data_files``, ...).
    """

    def __init__(self, name: str = SLIMPAJAMA_HUB_NAME, *, split: str = "train", sources: Sequence[str] | None = None,
                 allow_download: bool = False, load_kwargs: dict[str, Any] | None = None) -> None:
        if not allow_download:
            raise ValueError(f"streaming {name!r} from the Hugging Face hub downloads data; opt in with "
                             "allow_download=True (DataConfig.allow_download), or point the data at local shards")
        if not name or "/" not in name:
            raise ValueError(f"hub data set name must look like 'owner/name', got {name!r}")
        self.name, self.split = name, split
        self.sources = frozenset(sources) if sources is not None else None
        self.load_kwargs = dict(load_kwargs or {})
        self.allow_download = allow_download
        self.files: list = []  # nothing to shard by file: streams share by document index
        self.stats = ReadStats()

    def load_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments given to ``datasets.load_dataset``."""
        return (self.name,), {"split": self.split, "streaming": True, **self.load_kwargs}

    def subset(self, files: list, *, quiet: bool = False) -> HubReader:
        if files:
            raise ValueError("a hub stream has no files to shard by; use shard_by='document'")
        return self

    def __iter__(self) -> Iterator[Document]:
        import datasets

        args, kwargs = self.load_arguments()
        where = f"{HUB_PREFIX}{self.name}[{self.split}]"
        for index, record in enumerate(datasets.load_dataset(*args, **kwargs)):
            doc = document_from_record(record, where, index + 1)
            if doc is None:
                self.stats.corrupt_lines += 1
                continue
            self.stats.sources_seen[doc.source] += 1
            if (self.sources is not None and doc.source not in self.sources) or not doc.text:
                self.stats.filtered += 1
                continue
            self.stats.documents += 1
            yield doc
