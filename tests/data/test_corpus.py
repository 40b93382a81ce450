"""The embedded corpus: real text, written as SlimPajama shards and read back unchanged."""

from __future__ import annotations

import json

import pytest
import zstandard

from lightning_optlab.data import EMBEDDED_SET_NAME, ShardReader, embedded_corpus, write_embedded_shards, write_shards


def test_embedded_corpus_is_natural_language():
    docs = embedded_corpus()
    text = " ".join(t for _, t in docs)
    assert len(docs) > 50 and len(text) > 300_000
    words = text.split()
    common = sum(w.lower() in {"the", "a", "of", "is", "to", "and", "in"} for w in words)
    assert common / len(words) > 0.08  # English prose, not random tokens or code alone


def test_written_shards_read_back_identical(tmp_path):
    paths = write_embedded_shards(tmp_path, n_shards=4)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        f"train/chunk1/example_train_{i}.jsonl.zst" for i in range(4)]
    with open(paths[0], "rb") as fh:  # really zstd, really SlimPajama's record shape
        first = zstandard.ZstdDecompressor().stream_reader(fh).read().split(b"\n")[0]
    assert set(json.loads(first)) == {"text", "meta"}
    reader = ShardReader(tmp_path)
    docs = list(reader)
    assert [d.text for d in docs] == [t for _, t in embedded_corpus()]
    assert {d.source for d in docs} == {EMBEDDED_SET_NAME}
    assert reader.stats.corrupt_lines == reader.stats.bad_shards == 0
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_embedded_shards(tmp_path, n_shards=4) == paths  # present: kept
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    with pytest.raises(ValueError, match="use an empty out_dir"):
        write_embedded_shards(tmp_path, n_shards=3)


def test_write_shards_plain_and_contiguous(tmp_path):
    recs = [{"text": f"t{i}", "meta": {"redpajama_set_name": "S"}} for i in range(10)]
    paths = write_shards(recs, tmp_path, n_shards=3, compress=False, stem="x_")
    assert [p.name for p in paths] == ["x_0.jsonl", "x_1.jsonl", "x_2.jsonl"]
    assert [len(p.read_text().splitlines()) for p in paths] == [3, 3, 4]
    assert [d.text for d in ShardReader(paths)] == [r["text"] for r in recs]


def test_stdlib_sources_are_a_second_source_set(tmp_path):
    from lightning_optlab.data import SOURCE_SET_NAME, DataConfig, parse_embedded, stdlib_sources

    files = stdlib_sources()
    paths = [p for p, _ in files]
    assert paths == sorted(paths) and len(files) > 300
    assert sum(len(t) for _, t in files) > 5_000_000  # several million tokens for a ~0.5M-parameter model
    assert not any("/test/" in f"/{p}" or p.split("/")[-1].startswith("test_") for p in paths)
    assert "json/decoder.py" in paths and "def " in dict(files)["json/decoder.py"]
    assert parse_embedded("embedded") == (EMBEDDED_SET_NAME,)
    assert parse_embedded("embedded:all") == (EMBEDDED_SET_NAME, SOURCE_SET_NAME)
    assert parse_embedded("/data/x") is None
    with pytest.raises(ValueError, match="unknown embedded source set"):
        DataConfig(data="embedded:CPythonTests")


def test_sources_filter_picks_an_embedded_set(tmp_path, monkeypatch):
    import lightning_optlab.data.corpus as corpus
    from lightning_optlab.data import SOURCE_SET_NAME, DataConfig, DataPipeline

    few = corpus.stdlib_sources()[:6]  # a slice keeps the test fast
    monkeypatch.setattr(corpus, "stdlib_sources", lambda root=None: few)
    pipe = DataPipeline(DataConfig(data="embedded:all", sources=[SOURCE_SET_NAME], val_fraction=0.0, val_batches=0,
                                   work_dir=str(tmp_path)))
    pipe.setup()
    docs = list(pipe._train_reader)
    assert [d.text for d in docs] == [t for _, t in few] and {d.source for d in docs} == {SOURCE_SET_NAME}
    meta = corpus.embedded_records(SOURCE_SET_NAME)[0]["meta"]
    assert meta["python"] and meta["path"] == few[0][0]
    assert len(list(tmp_path.glob(f"embedded-CPythonSource-{meta['python']}/train/chunk1/*.jsonl.zst"))) == 16
    default = DataPipeline(DataConfig(data="embedded", val_batches=0, work_dir=str(tmp_path)))
    default.setup()
    assert {d.source for d in default._train_reader} == {EMBEDDED_SET_NAME}  # the default is unchanged
