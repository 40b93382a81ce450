"""``prepare``: tokenize text once into memory-mapped token shards (the format is in :mod:`.shards`).

One *unit* of work per input file (for the hub stream: per ``hub_docs_per_shard`` documents);
units are tokenized in parallel worker processes, each writes its own ``train-<unit>.bin`` and
``val-<unit>.bin`` (atomically: to a temporary name, then renamed) and the main process appends
a line to ``prepare.journal.jsonl`` when a unit is finished. An interrupted prepare, run again
with the same arguments, checks the journal's settings, keeps the finished units whose shards are
intact and does the rest; the index is written last, from the journal. The split into training
and validation documents (``sha1(text) < val_fraction``, :func:`~.packing.in_validation`) is made
here, once. Shards are in unit order and documents in input order, so the training token stream
equals the one the streaming packer makes from the same documents and tokenizer.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import embedded_set_dir, parse_embedded, write_embedded_shards
from .hub import HUB_PREFIX, HubReader
from .packing import in_validation
from .reader import ShardReader, resolve_paths
from .shards import FORMAT, FORMAT_VERSION, INDEX_NAME, JOURNAL_NAME, TOKENIZER_NAME, token_dtype
from .tokenizer import ByteTokenizer, TextTokenizer, train_bpe

__all__ = ["PrepareConfig", "prepare"]

_ENCODE_BATCH = 256  # documents tokenized per encode_batch call
_MAX_WARNINGS = 20  # problems warned about individually, as ShardReader does


@dataclass(kw_only=True)
class PrepareConfig:
    """What ``optlab data prepare`` reads, how it tokenizes and where it writes."""

    #: inputs: shard files, directories, globs (SlimPajama .jsonl.zst, C4 .json.gz, JSONL); "embedded",
    #: "embedded:CPythonSource", "embedded:all"; or one "hub:<owner>/<name>" (needs allow_download)
    inputs: list[str]
    #: the output directory
    out: str
    #: "bytes", "bpe" (trained here on the training split) or the path of a tokenizer.json
    tokenizer: str = "bytes"
    #: end-of-document token of a tokenizer file
    eos_token: str = "<|endoftext|>"
    #: vocabulary of the trained BPE (tokenizer="bpe")
    vocab_size: int = 4096
    #: characters of training text the BPE learns from
    bpe_train_chars: int = 20_000_000
    #: keep only these meta.redpajama_set_name values (None: all)
    sources: list[str] | None = None
    #: share of documents held out by text hash (0: everything is training data)
    val_fraction: float = 0.05
    #: tokenizer worker processes (1: tokenize in this process)
    workers: int = 1
    #: permit a hub:... input to stream over the network
    allow_download: bool = False
    #: split of the hub data set
    hub_split: str = "train"
    #: documents per shard of a hub stream
    hub_docs_per_shard: int = 50_000
    #: where the embedded corpora are written as text shards first
    work_dir: str = "optlab_runs/data"
    #: show a progress bar (tqdm)
    progress: bool = True
    #: the command line, recorded in the index so that errors can say how to re-run it
    command: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ValueError("no inputs: give shard files, directories, globs, 'embedded' or 'hub:<owner>/<name>'")
        hub = [e for e in self.inputs if str(e).startswith(HUB_PREFIX)]
        if hub and len(self.inputs) > 1:
            raise ValueError(f"a hub stream ({hub[0]!r}) cannot be combined with other inputs; prepare it alone")
        if hub and not self.allow_download:
            raise ValueError(f"{hub[0]!r} streams from the Hugging Face hub and downloads data; pass "
                             "--allow-download to opt in, or prepare local shards")
        for name, low in (("workers", 1), ("vocab_size", 1), ("bpe_train_chars", 1), ("hub_docs_per_shard", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size < 258:
            raise ValueError(f"vocab_size must be ≥ 258 for tokenizer='bpe', got {self.vocab_size}")
        if self.tokenizer not in ("bytes", "bpe") and not Path(self.tokenizer).expanduser().is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer} (give 'bytes', 'bpe' or the path "
                                    "of a tokenizer.json)")
        if self.sources is not None and (isinstance(self.sources, str) or not self.sources):
            raise ValueError(f"sources must be a non-empty list of set names or None, got {self.sources!r}")


# --------------------------------------------------------------------------- inputs
def _input_files(cfg: PrepareConfig) -> tuple[list[Path], list[str]]:
    """The input files in reading order, and the embedded sets among them (written on demand)."""
    entries, sets = [], []
    for entry in cfg.inputs:
        chosen = parse_embedded(str(entry))
        if chosen is None:
            entries.append(entry)
            continue
        for name in chosen:
            write_embedded_shards(embedded_set_dir(Path(cfg.work_dir).expanduser(), name), set_name=name)
            entries.append(str(embedded_set_dir(Path(cfg.work_dir).expanduser(), name)))
            sets.append(name)
    return resolve_paths(entries), sets


def _build_tokenizer(cfg: PrepareConfig, out: Path, files: list[Path]) -> TextTokenizer:
    path = out / TOKENIZER_NAME
    if path.is_file():  # a resumed prepare: the journal's fingerprint decides whether it is the same one
        return TextTokenizer.from_file(path, eos_token=cfg.eos_token)
    if cfg.tokenizer == "bytes":
        tok: TextTokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        tok = train_bpe(_bpe_texts(cfg, files), cfg.vocab_size)
    else:
        tok = TextTokenizer.from_file(Path(cfg.tokenizer).expanduser(), eos_token=cfg.eos_token)
    tok.save(path)
    return TextTokenizer.from_file(path, eos_token=cfg.eos_token)


def _bpe_texts(cfg: PrepareConfig, files: list[Path]) -> Iterator[str]:
    reader = _hub_reader(cfg) if not files else ShardReader((), sources=cfg.sources, quiet=True, _files=files)
    total = 0
    for doc in reader:
        if in_validation(doc.text, cfg.val_fraction):
            continue
        yield doc.text
        total += len(doc.text)
        if total >= cfg.bpe_train_chars:
            return


def _hub_reader(cfg: PrepareConfig) -> HubReader:
    return HubReader(cfg.inputs[0][len(HUB_PREFIX):], split=cfg.hub_split, sources=cfg.sources,
                     allow_download=cfg.allow_download)


# --------------------------------------------------------------------------- one unit (in a worker)
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos_token: str, settings: dict) -> None:
    from tokenizers import Tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
    _WORKER.update(tokenizer=TextTokenizer(Tokenizer.from_str(tokenizer_json), eos_token), settings=settings)


class _ShardWriter:
    """Appends ``ids + [eos]`` per document to a temporary file; renamed into place when complete."""

    def __init__(self, out: Path, name: str, dtype: np.dtype, eos_id: int) -> None:
        self.final, self.dtype, self.eos_id = out / name, dtype, eos_id
        self.tmp = out / f".{name}.{os.getpid()}.tmp"
        self.fh = open(self.tmp, "wb")
        self.documents, self.tokens, self.sources = 0, 0, Counter()

    def add(self, docs: list[tuple[list[int], str | None]]) -> None:
        if not docs:
            return
        flat = np.fromiter(itertools.chain.from_iterable(ids + [self.eos_id] for ids, _ in docs),
                           dtype=np.int64)
        flat.astype(self.dtype).tofile(self.fh)
        self.documents += len(docs)
        self.tokens += flat.size
        self.sources.update(str(s) for _, s in docs)

    def close(self, unit: int, where: str) -> dict | None:
        self.fh.close()
        if self.tokens == 0:
            self.tmp.unlink()
            return None
        os.replace(self.tmp, self.final)
        return {"file": self.final.name, "unit": unit, "input": where, "documents": self.documents,
                "tokens": self.tokens, "sources": dict(sorted(self.sources.items()))}


def _tokenize_unit(task: tuple[int, str, list | None]) -> dict:
    """Tokenize one input file (or one chunk of hub documents) into its train and val shards."""
    unit, where, texts = task
    tok: TextTokenizer = _WORKER["tokenizer"]
    s = _WORKER["settings"]
    out, dtype = Path(s["out"]), np.dtype(s["numpy_dtype"])
    writers = {split: _ShardWriter(out, f"{split}-{unit:06d}.bin", dtype, tok.eos_id) for split in ("train", "val")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if texts is None:
            reader = ShardReader((), sources=s["sources"], max_warnings=_MAX_WARNINGS, _files=[Path(where)])
            docs: Iterable = ((d.text, d.source) for d in reader)
        else:
            reader, docs = None, iter(texts)
        for batch in iter(lambda: list(itertools.islice(docs, _ENCODE_BATCH)), []):  # noqa: B023
            ids = tok.encode_batch([t for t, _ in batch])
            for split in ("train", "val"):
                want_val = split == "val"
                writers[split].add([(i, src) for i, (t, src) in zip(ids, batch)
                                    if in_validation(t, s["val_fraction"]) == want_val])
    stats = _stats_dict(reader.stats) if reader is not None else {"documents": len(texts)}
    return {"unit": unit, "input": where, "bytes": s["sizes"].get(where, 0), "read": stats,
            "warnings": [str(w.message) for w in caught][: _MAX_WARNINGS + 1],
            "shards": {split: w.close(unit, where) for split, w in writers.items()}}


def _stats_dict(stats: Any) -> dict:
    """A :class:`ReadStats` as JSON-ready counts (``asdict`` would turn its Counter into pairs)."""
    out = {f.name: getattr(stats, f.name) for f in fields(stats) if f.name != "sources_seen"}
    out["sources_seen"] = {str(k): v for k, v in stats.sources_seen.items()}
    return out


# --------------------------------------------------------------------------- journal
def _read_journal(path: Path) -> tuple[dict | None, dict[int, dict]]:
    if not path.is_file():
        return None, {}
    plan, done = None, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the last line of a killed prepare may be cut short: that unit is redone
            continue
        if "plan" in entry:
            plan = entry["plan"]
        elif "unit" in entry:
            done[int(entry["unit"])] = entry
    return plan, done


def _intact(out: Path, entry: dict, dtype: np.dtype) -> bool:
    for shard in entry["shards"].values():
        if shard is None:
            continue
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
            return False
    return True


def _append(fh, entry: dict) -> None:  # noqa: ANN001
    fh.write(json.dumps(entry) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


# --------------------------------------------------------------------------- prepare
def _plan(cfg: PrepareConfig, tok: TextTokenizer, files: list[Path], sets: list[str]) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "inputs": [str(e) for e in cfg.inputs],
            "files": [str(f) for f in files], "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "eos_token": tok.eos_token,
            "numpy_dtype": token_dtype(tok.vocab_size).str, "val_fraction": cfg.val_fraction,
            "sources": sorted(cfg.sources) if cfg.sources else None, "embedded_sets": sets,
            "python": platform.python_version() if sets else None,
            "hub": {"split": cfg.hub_split, "docs_per_shard": cfg.hub_docs_per_shard} if not files else None}


def _check_plan(saved: dict, plan: dict, out: Path) -> None:
    diff = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
    if diff:
        details = "; ".join(f"{k}: before {saved.get(k)!r}, now {plan.get(k)!r}" for k in diff if k != "files")
        if "files" in diff:
            details += "; the input files differ"
        raise ValueError(f"{out} holds a prepare with other settings ({details}); give another --out, or delete "
                         f"{out} to start over")


def _tasks(cfg: PrepareConfig, files: list[Path], done: dict[int, dict],
           hub: HubReader | None) -> Iterator[tuple[int, str, list | None]]:
    if hub is None:
        yield from ((i, str(f), None) for i, f in enumerate(files) if i not in done)
        return
    docs = iter(hub)
    where = f"{cfg.inputs[0]}[{cfg.hub_split}]"
    for unit in itertools.count():
        chunk = list(itertools.islice(docs, cfg.hub_docs_per_shard))
        if not chunk:
            return
        if unit not in done:
            yield unit, f"{where} documents {unit * cfg.hub_docs_per_shard}..", [(d.text, d.source) for d in chunk]


def _run_units(cfg: PrepareConfig, tasks: Iterator, init_args: tuple, on_done) -> None:  # noqa: ANN001
    if cfg.workers == 1:
        _init_worker(*init_args)
        for task in tasks:
            on_done(_tokenize_unit(task))
        return
    # fork: workers start at once and need no importable __main__ (a spawned worker re-imports it);
    # TOKENIZERS_PARALLELISM=false (set by prepare) keeps the tokenizer's thread pool out of the fork
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: list = []
        for task in tasks:  # at most 2 units per worker in flight: a hub stream is never read ahead
            pending.append(pool.apply_async(_tokenize_unit, (task,)))
            while len(pending) >= 2 * cfg.workers:
                pending = _collect(pending, on_done)
        while pending:
            pending = _collect(pending, on_done)


def _collect(pending: list, on_done) -> list:  # noqa: ANN001
    pending[0].wait()
    still = []
    for res in pending:
        if res.ready():
            on_done(res.get())
        else:
            still.append(res)
    return still


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into token shards under ``cfg.out``; returns the index (also ``out/index.json``).

    Running it again on a finished directory checks it and rewrites only missing or damaged shards.
    """
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    is_hub = str(cfg.inputs[0]).startswith(HUB_PREFIX)
    files, sets = ([], []) if is_hub else _input_files(cfg)
    tok = _build_tokenizer(cfg, out, files)
    plan = _plan(cfg, tok, files, sets)
    journal = out / JOURNAL_NAME
    saved, done = _read_journal(journal)
    if saved is not None:
        _check_plan(saved, plan, out)
    dtype = np.dtype(plan["numpy_dtype"])
    done = {u: e for u, e in done.items() if _intact(out, e, dtype)}
    if (out / INDEX_NAME).is_file():
        (out / INDEX_NAME).unlink()  # rewritten below; a half-updated directory has no index
    sizes = {str(f): f.stat().st_size for f in files}
    settings = {"out": str(out), "numpy_dtype": plan["numpy_dtype"], "sources": cfg.sources,
                "val_fraction": cfg.val_fraction, "sizes": sizes}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bar = _progress(cfg, sizes, done)
    warned = [sum(len(e.get("warnings", [])) for e in done.values())]
    with open(journal, "a", encoding="utf-8") as fh:
        if saved is None:
            _append(fh, {"plan": plan})

        def on_done(entry: dict) -> None:
            _append(fh, entry)
            done[entry["unit"]] = entry
            for message in entry["warnings"]:
                warned[0] += 1
                if warned[0] <= _MAX_WARNINGS:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                elif warned[0] == _MAX_WARNINGS + 1:
                    warnings.warn("further unreadable lines/shards are counted in the index ('read') but not "
                                  "reported", RuntimeWarning, stacklevel=2)
            _advance(bar, entry, done)

        hub = _hub_reader(cfg) if is_hub else None
        _run_units(cfg, _tasks(cfg, files, done, hub), (tok.to_json(), tok.eos_token, settings), on_done)
    if bar is not None:
        bar.close()
    index = _index(cfg, plan, done, hub.stats if hub is not None else None)
    tmp = out / f".{INDEX_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, out / INDEX_NAME)
    return index


def _progress(cfg: PrepareConfig, sizes: dict[str, int], done: dict[int, dict]):  # noqa: ANN202
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(sizes.values()) or None, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
               initial=sum(e["bytes"] for e in done.values()), dynamic_ncols=True)
    _advance(bar, None, done)
    return bar


def _advance(bar, entry: dict | None, done: dict[int, dict]) -> None:  # noqa: ANN001
    if bar is None:
        return
    if entry is not None:
        bar.update(entry["bytes"])
    docs = sum(s["documents"] for e in done.values() for s in e["shards"].values() if s)
    tokens = sum(s["tokens"] for e in done.values() for s in e["shards"].values() if s)
    bar.set_postfix(docs=f"{docs:,}", tokens=f"{tokens:,}", refresh=False)


def _index(cfg: PrepareConfig, plan: dict, done: dict[int, dict], hub_stats: Any = None) -> dict[str, Any]:
    read: Counter = Counter()
    seen: Counter = Counter()
    if hub_stats is not None:  # a hub stream is read here, not in the workers: its counts are this process's
        stats = _stats_dict(hub_stats)
        seen.update(stats.pop("sources_seen"))
        read.update({k: v for k, v in stats.items() if k != "documents"})
    splits: dict[str, dict] = {}
    for unit in sorted(done):
        entry = done[unit]
        seen.update(entry["read"].get("sources_seen", {}))
        read.update({k: v for k, v in entry["read"].items() if isinstance(v, int)})
        for split, shard in entry["shards"].items():
            s = splits.setdefault(split, {"documents": 0, "tokens": 0, "shards": []})
            if shard is not None:
                s["shards"].append(shard)
                s["documents"] += shard["documents"]
                s["tokens"] += shard["tokens"]
    if not any(s["shards"] for s in splits.values()):
        raise ValueError(f"no documents to prepare in {cfg.inputs} (source sets seen: {dict(seen)}, filter "
                         f"{cfg.sources}); check the inputs and --sources")
    index = {k: v for k, v in plan.items() if k not in ("files",)}
    index.update(dtype=np.dtype(plan["numpy_dtype"]).name, tokenizer=TOKENIZER_NAME,
                 read={**dict(read), "sources_seen": dict(sorted(seen.items()))},
                 command=cfg.command or _default_command(cfg), splits=splits)
    return index


def _default_command(cfg: PrepareConfig) -> str:
    args = ["optlab", "data", "prepare", *cfg.inputs, "--tokenizer", cfg.tokenizer, "--out", cfg.out]
    if cfg.tokenizer == "bpe":
        args += ["--vocab-size", str(cfg.vocab_size)]
    if cfg.sources:
        args += ["--sources", *cfg.sources]
    args += ["--val-fraction", str(cfg.val_fraction)]
    return shlex.join(str(a) for a in args)

