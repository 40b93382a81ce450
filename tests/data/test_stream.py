"""The packed stream: rank/worker shards, the hash split, and exact resume from a batch count."""

from __future__ import annotations

import itertools

import pytest
import torch
from _shards import make_docs, write_corpus, write_zst
from torch.utils.data import DataLoader

from lightning_optlab.data import ByteTokenizer, PackedDataset, ShardReader, batches_before, in_validation

SEQ, BATCH = 15, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(40)
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs, n_shards=4), docs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """12 documents: about 47 batches per pass, so 70 batches cross an epoch boundary."""
    return write_corpus(tmp_path_factory.mktemp("small"), make_docs(12, seed=1), n_shards=2)


def _ds(root, **kw):
    kw = {"seq_len": SEQ, "batch_size": BATCH, **kw}
    return PackedDataset(ShardReader(root), ByteTokenizer(), **kw)


def _take(ds, n, workers=None):
    workers = ds.num_workers if workers is None else workers
    return list(itertools.islice(iter(DataLoader(ds, batch_size=None, num_workers=workers)), n))


def test_batches_are_the_packed_documents(corpus):
    root, docs = corpus
    ds = _ds(root, cycle=False)
    stream = [t for d in docs for t in (*d["text"].encode(), 256)]
    flat = torch.cat([b.reshape(-1) for b in ds]).tolist()
    blocks = len(stream) // (SEQ + 1) // BATCH * BATCH
    assert flat == stream[: blocks * (SEQ + 1)]
    first = next(iter(ds))
    assert first.shape == (BATCH, SEQ + 1) and first.dtype == torch.long


@pytest.mark.parametrize("shard_by", ["document", "file"])
def test_rank_and_worker_streams_are_disjoint_and_cover(corpus, shard_by):
    root, docs = corpus
    train = [d["text"] for d in docs if not in_validation(d["text"], 0.2)]
    seen = []
    for rank in range(2):
        ds = _ds(root, rank=rank, world_size=2, num_workers=2, val_fraction=0.2, shard_by=shard_by, cycle=False)
        for w in range(2):
            seen.append(list(ds.stream_texts(rank * 2 + w)))
    assert all(seen)
    flat = [t for s in seen for t in s]
    assert len(flat) == len(set(flat)) and set(flat) == set(train)


def test_two_workers_deliver_the_streams_alternately(corpus):
    root, _ = corpus
    ds = _ds(root, num_workers=2, rank=1, world_size=2)
    got = _take(ds, 8)
    a, b = ds.batches(2), ds.batches(3)  # rank 1 owns streams 2 and 3
    expected = [next(a) if j % 2 == 0 else next(b) for j in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


def test_train_and_validation_never_share_a_document(corpus):
    root, docs = corpus
    train = set(_ds(root, split="train", val_fraction=0.25).stream_texts(0))
    val = set(_ds(root, split="val", val_fraction=0.25).stream_texts(0))
    assert val and train and not train & val
    assert train | val == {d["text"] for d in docs}
    assert val == {d["text"] for d in docs if in_validation(d["text"], 0.25)}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [0, 5])
def test_resume_continues_at_the_same_batch(small, workers, shuffle):
    """k batches, a fresh dataset from the saved state: the next batches are the uninterrupted ones."""
    root = small
    straight = _take(_ds(root, num_workers=workers, shuffle_buffer=shuffle, seed=1), 70)
    for k in (0, 1, 3, 4, 61):
        first = _ds(root, num_workers=workers, shuffle_buffer=shuffle, seed=1)
        first.record_batches(k)
        resumed = _ds(root, num_workers=workers, shuffle_buffer=shuffle, seed=1)
        resumed.load_state_dict(first.state_dict())
        got = _take(resumed, 70 - k)
        assert len(got) == 70 - k
        assert all(torch.equal(x, y) for x, y in zip(got, straight[k:])), f"k={k}"


def test_stream_cycles_over_epochs(small):
    root = small
    once = torch.cat(list(_ds(root, cycle=False))).reshape(-1)
    many = torch.cat(_take(_ds(root), 3 * len(once) // (BATCH * (SEQ + 1)))).reshape(-1)
    assert torch.equal(many[: len(once)], once) and len(many) > 2 * len(once)


def test_batches_before():
    for n in (1, 2, 3):
        for k in range(10):
            for w in range(n):
                assert batches_before(k, w, n) == sum(1 for j in range(k) if j % n == w)


def test_layout_and_argument_errors(corpus, tmp_path):
    root, _ = corpus
    state = _ds(root, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers: saved 2, now 0"):
        _ds(root).load_state_dict(state)
    with pytest.raises(ValueError, match="built for num_workers=2 but the DataLoader runs 0"):
        next(iter(DataLoader(_ds(root, num_workers=2), batch_size=None)))
    with pytest.raises(ValueError, match="rank must be in"):
        _ds(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="val_fraction=0 holds no documents"):
        _ds(root, split="val")
    with pytest.raises(ValueError, match="one file per stream"):
        _ds(root, world_size=5, shard_by="file")
    nothing = PackedDataset(ShardReader(root, sources=["NoSuchSet"]), ByteTokenizer(), seq_len=4, batch_size=1)
    with pytest.raises(RuntimeError, match="has no 'train' documents.*'RedPajamaBook': 20"):
        next(iter(nothing))


def test_lone_surrogates_in_json_text_do_not_stop_the_stream(tmp_path):
    """JSON can escape half a surrogate pair; UTF-8 cannot encode it. The character becomes U+FFFD
    and the rest of the document is kept (it used to crash tokenization)."""
    raw = [b'{"text": "lone \\ud83d half, a pair \\ud83d\\ude00 and more", "meta": {"redpajama_set_name": "X"}}']
    root = tmp_path / "shards"
    write_zst(root / "a.jsonl.zst", raw + make_docs(3))
    docs = list(ShardReader(root))
    assert docs[0].text == "lone \ufffd half, a pair \U0001F600 and more"
    batches = list(PackedDataset(ShardReader(root), ByteTokenizer(), seq_len=8, batch_size=2, cycle=False))
    stream = torch.cat([b.reshape(-1) for b in batches])
    assert bytes(stream[:10].tolist()).startswith("lone \ufffd".encode())
