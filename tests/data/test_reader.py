"""The SlimPajama/C4 shard reader: formats, order, corrupt lines and shards, filters, path errors."""

from __future__ import annotations

import json
import warnings

import pytest
from _shards import make_docs, write_corpus, write_gz, write_plain, write_zst

from lightning_optlab.data import reader as reader_mod
from lightning_optlab.data import ShardReader, resolve_paths


def _read(paths, **kw):
    reader = ShardReader(paths, **kw)
    return reader, list(reader)


@pytest.mark.parametrize("write, name", [(write_plain, "a.jsonl"), (write_zst, "a.jsonl.zst"), (write_gz, "a.json.gz")])
def test_reads_every_format(tmp_path, write, name):
    docs = make_docs(7)
    reader, out = _read(write(tmp_path / name, docs))
    assert [d.text for d in out] == [d["text"] for d in docs]
    assert [d.source for d in out] == [d["meta"]["redpajama_set_name"] for d in docs]
    assert [d.line for d in out] == list(range(1, 8))
    assert reader.stats.documents == 7 and reader.stats.corrupt_lines == 0


def test_c4_records_without_meta(tmp_path):
    recs = [{"text": "C4 page one", "timestamp": "2019-04-25T12:57:54Z", "url": "https://a"}, {"text": "page two"}]
    _, out = _read(write_gz(tmp_path / "c4-train.00000-of-01024.json.gz", recs))
    assert [(d.text, d.source) for d in out] == [("C4 page one", None), ("page two", None)]


@pytest.mark.parametrize("write, name", [(write_plain, "s.jsonl"), (write_zst, "s.jsonl.zst"), (write_gz, "s.json.gz")])
def test_corrupt_lines_are_counted_and_named(tmp_path, write, name):
    docs = make_docs(4)
    lines = [docs[0], b'{"text": "cut off', docs[1], b"[1, 2, 3]", b"", docs[2], b'{"meta": {}}', b"\xff\xfe", docs[3]]
    path = write(tmp_path / name, lines)
    with pytest.warns(RuntimeWarning) as record:
        reader, out = _read(path)
    assert [d.text for d in out] == [d["text"] for d in docs]
    assert reader.stats.corrupt_lines == 4  # the blank line is not a record, not a corruption
    messages = [str(w.message) for w in record]
    for line in (2, 4, 7, 8):
        assert any(f"{path}: line {line}:" in m for m in messages), messages
    assert [d.line for d in out] == [1, 3, 6, 9]


def test_non_zstd_file_named_zst_is_a_bad_shard(tmp_path):
    good = write_zst(tmp_path / "a_0.jsonl.zst", make_docs(3))
    bad = write_plain(tmp_path / "a_1.jsonl.zst", make_docs(3))  # plain text under a .zst name
    with pytest.warns(RuntimeWarning, match=f"{bad}: line 1: undecodable shard"):
        reader, out = _read([good, bad])
    assert len(out) == 3 and reader.stats.bad_shards == 1 and reader.stats.files == 2


def test_truncated_zstd_shard_keeps_nothing_silently(tmp_path):
    path = tmp_path / "t.jsonl.zst"
    write_zst(path, make_docs(5))
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.warns(RuntimeWarning, match="undecodable shard.*truncated"):
        reader, _ = _read(path)
    assert reader.stats.bad_shards == 1


def test_truncated_gzip_shard(tmp_path):
    path = write_gz(tmp_path / "t.json.gz", make_docs(50))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.warns(RuntimeWarning, match=f"{path}: line \\d+: undecodable shard"):
        reader, out = _read(path)
    assert reader.stats.bad_shards == 1 and len(out) < 50


def test_multi_frame_zstd_and_lines_longer_than_a_chunk(tmp_path, monkeypatch):
    import zstandard

    monkeypatch.setattr(reader_mod, "_CHUNK", 7)  # every line spans several reads
    docs = make_docs(6)
    half = [json.dumps(d).encode() + b"\n" for d in docs]
    frame = zstandard.ZstdCompressor().compress
    blob = frame(b"".join(half[:3])) + frame(b"".join(half[3:]))
    (tmp_path / "m.jsonl.zst").write_bytes(blob)
    _, out = _read(tmp_path / "m.jsonl.zst")
    assert [d.text for d in out] == [d["text"] for d in docs]


def test_source_filter(tmp_path):
    docs = make_docs(9, sets=("RedPajamaWikipedia", "RedPajamaBook", "RedPajamaArXiv"))
    path = write_zst(tmp_path / "s.jsonl.zst", docs)
    reader, out = _read(path, sources=["RedPajamaWikipedia", "RedPajamaArXiv"])
    assert [d.text for d in out] == [d["text"] for i, d in enumerate(docs) if i % 3 != 1]
    assert reader.stats.filtered == 3
    assert reader.stats.sources_seen == {"RedPajamaWikipedia": 3, "RedPajamaBook": 3, "RedPajamaArXiv": 3}
    with pytest.raises(ValueError, match="list of set names"):
        ShardReader(path, sources="RedPajamaBook")


def test_directories_are_read_recursively_in_natural_order(tmp_path):
    names = ["chunk10/example_train_0.jsonl.zst", "chunk2/example_train_10.jsonl.zst",
             "chunk2/example_train_9.jsonl.zst", "chunk1/example_train_0.jsonl"]
    for i, name in enumerate(names):
        write = write_zst if name.endswith("zst") else write_plain
        write(tmp_path / name, [{"text": f"doc {i}"}])
    (tmp_path / "chunk1" / "README.md").write_text("not a shard")
    files = resolve_paths(tmp_path)
    assert [str(f.relative_to(tmp_path)) for f in files] == [
        "chunk1/example_train_0.jsonl", "chunk2/example_train_9.jsonl.zst",
        "chunk2/example_train_10.jsonl.zst", "chunk10/example_train_0.jsonl.zst"]
    assert resolve_paths(str(tmp_path / "chunk2" / "*.zst")) == files[1:3]
    assert resolve_paths([files[3], str(tmp_path / "chunk*")]) == [files[3], *files[:3]]  # given order, no repeats


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*nowhere"):
        resolve_paths(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_paths(str(tmp_path / "*.jsonl.zst"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard files .* under directory .*empty"):
        resolve_paths(tmp_path / "empty")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match="unknown shard format"):
        resolve_paths(tmp_path / "x.parquet")


def test_warnings_are_capped_but_everything_is_counted(tmp_path):
    path = write_plain(tmp_path / "bad.jsonl", [b"not json"] * 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader, out = _read(path, max_warnings=5)
    assert out == [] and reader.stats.corrupt_lines == 30
    assert len(caught) == 6 and "counted" in str(caught[-1].message)


def test_reader_streams_without_reading_whole_files(tmp_path, monkeypatch):
    """The first document comes out after one chunk of a large shard has been read."""
    docs = make_docs(2000)
    path = write_corpus(tmp_path, docs, n_shards=1) / "part_0.jsonl.zst"
    reads = []
    real = reader_mod._zstd_chunks

    def counting(fh):
        for chunk in real(fh):
            reads.append(len(chunk))
            yield chunk

    monkeypatch.setattr(reader_mod, "_CHUNK", 4096)
    monkeypatch.setattr(reader_mod, "_zstd_chunks", counting)
    first = next(iter(ShardReader(path)))
    assert first.text == docs[0]["text"]
    total = len(b"".join(json.dumps(d).encode() + b"\n" for d in docs))
    assert 0 < sum(reads) < total / 4, (sum(reads), total)
