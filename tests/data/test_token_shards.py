"""Token shards: prepare, equivalence with the streaming packer, position reads, resume, bad inputs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from _shards import make_docs, write_corpus, write_zst
from torch.utils.data import DataLoader

from lightning_optlab.data import (
    ByteTokenizer,
    DataConfig,
    DataPipeline,
    PackedDataset,
    PrepareConfig,
    ShardReader,
    TokenShardDataset,
    TokenShards,
    in_validation,
    permute_blocks,
    prepare,
    token_dtype,
    train_bpe,
)
from lightning_optlab.data.cli import main as data_main


def _prepare(tmp_path, docs=None, name="out", **kw):
    root = write_corpus(tmp_path / "src", docs or make_docs(40), n_shards=3)
    kw = {"inputs": [str(root)], "out": str(tmp_path / name), "tokenizer": "bytes", "val_fraction": 0.2,
          "progress": False, **kw}
    return root, prepare(PrepareConfig(**kw))


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 7, 100, 1001):
        p = permute_blocks(np.arange(n), n, seed=3, epoch=0)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute_blocks(np.arange(1000), 1000, 0, 0), permute_blocks(np.arange(1000), 1000, 0, 1)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    assert np.array_equal(a, permute_blocks(np.arange(1000), 1000, 0, 0))
    assert np.array_equal(permute_blocks(np.array([5, 17]), 1000, 0, 0), a[[5, 17]])  # per index, no table


def test_prepared_stream_equals_the_packer_and_numpy_reads_it(tmp_path):
    docs = make_docs(40)
    root, index = _prepare(tmp_path, docs)
    out = tmp_path / "out"
    tok = ByteTokenizer()
    train = [d["text"] for d in docs if not in_validation(d["text"], 0.2)]
    expect = [i for t in train for i in tok.encode(t) + [tok.eos_id]]
    # numpy alone, as docs/data.md shows
    meta = json.loads((out / "index.json").read_text())
    stream = np.concatenate([np.memmap(out / s["file"], dtype=meta["numpy_dtype"], mode="r")
                             for s in meta["splits"]["train"]["shards"]])
    assert stream.tolist() == expect and meta["dtype"] == "uint16"
    assert index["splits"]["train"]["documents"] == len(train)
    assert index["splits"]["val"]["documents"] == len(docs) - len(train)
    assert sum(sum(s["sources"].values()) for s in meta["splits"]["train"]["shards"]) == len(train)
    # the streaming packer's blocks, one stream, no shuffle: the same blocks in the same order
    packed = PackedDataset(ShardReader(root), tok, seq_len=16, batch_size=1, split="train", val_fraction=0.2,
                           cycle=False)
    blocks = [b for b in packed.blocks(0)]
    ds = TokenShardDataset(TokenShards(out), seq_len=16, batch_size=1, cycle=False)
    assert ds.n_blocks == len(blocks)
    assert [ds.batch(k)[0].tolist() for k in range(len(blocks))] == blocks


def test_bpe_prepare_with_two_workers_equals_one(tmp_path):
    docs = make_docs(60, seed=1)
    tok = train_bpe((d["text"] for d in docs), 300)
    tok.save(tmp_path / "tok.json")
    _, one = _prepare(tmp_path, docs, "one", tokenizer=str(tmp_path / "tok.json"))
    _, two = _prepare(tmp_path, docs, "two", tokenizer=str(tmp_path / "tok.json"), workers=2)
    assert one["splits"] == two["splits"] and one["vocab_size"] == 300
    for s in one["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / s["file"]).read_bytes() == (tmp_path / "two" / s["file"]).read_bytes()


def test_interrupted_prepare_resumes_and_damage_is_redone(tmp_path, monkeypatch):
    import importlib

    prep = importlib.import_module("lightning_optlab.data.prepare")

    _, full = _prepare(tmp_path, name="ref")
    calls = []
    real = prep._tokenize_unit

    def dies_on_third(task):
        calls.append(task[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "_tokenize_unit", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path)
    out = tmp_path / "out"
    assert not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TokenShards(out)
    calls.clear()
    monkeypatch.setattr(prep, "_tokenize_unit", lambda task: calls.append(task[0]) or real(task))
    _, resumed = _prepare(tmp_path)
    assert calls == [2] and resumed["splits"] == full["splits"]  # only the unfinished file was tokenized
    # a truncated shard: reading fails naming it; prepare again rewrites just that one
    shard = out / resumed["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated.*optlab data prepare"):
        TokenShards(out)
    calls.clear()
    _prepare(tmp_path)
    assert calls == [1] and TokenShards(out).n_tokens == full["splits"]["train"]["tokens"]
    with pytest.raises(ValueError, match="other settings.*val_fraction"):
        _prepare(tmp_path, val_fraction=0.1)


def test_bad_directories_fail_naming_the_file_and_fix(tmp_path):
    _, index = _prepare(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="not a prepared token-shard directory.*optlab data prepare"):
        TokenShards(tmp_path / "src")
    first = out / index["splits"]["train"]["shards"][0]["file"]
    saved = first.read_bytes()
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first.name}.*missing.*prepare"):
        TokenShards(out)
    # a shard of another vocabulary (same length, ids past 257 and another end id)
    np.full(len(saved) // 2, 1000, dtype="<u2").tofile(first)
    with pytest.raises(ValueError, match="another tokenizer|another vocabulary"):
        TokenShards(out)
    first.write_bytes(saved)
    text = (out / "index.json").read_text()
    (out / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="index.json is not valid JSON.*prepare"):
        TokenShards(out)


def test_corrupt_records_are_counted_and_reported(tmp_path):
    root = tmp_path / "src"
    write_zst(root / "a.jsonl.zst", make_docs(5) + [b"{not json", {"meta": {}}])
    (root / "b.jsonl.zst").write_bytes(b"this is not zstd")
    with pytest.warns(RuntimeWarning, match="corrupt record"):
        index = prepare(PrepareConfig(inputs=[str(root)], out=str(tmp_path / "out"), val_fraction=0.0,
                                      progress=False))
    assert index["read"]["corrupt_lines"] == 2 and index["read"]["bad_shards"] == 1
    assert index["splits"]["train"]["documents"] == 5


def test_positions_disjoint_over_ranks_and_independent_of_workers(tmp_path):
    _prepare(tmp_path, make_docs(80))
    shards = TokenShards(tmp_path / "out")
    kw = {"seq_len": 8, "batch_size": 2, "shuffle": True, "seed": 5}
    ranks = [TokenShardDataset(shards, rank=r, world_size=2, **kw) for r in range(2)]
    per_epoch = ranks[0].batches_per_epoch()
    seen = [b for ds in ranks for k in range(per_epoch) for b in ds.block_ids(k).tolist()]
    assert len(seen) == len(set(seen))  # no block twice in an epoch, across ranks
    ref = TokenShardDataset(shards, **kw)
    want = [ref.batch(k) for k in range(7, 13)]
    for workers in (0, 2):
        ds = TokenShardDataset(shards, num_workers=workers, batches_consumed=7, **kw)
        got = list(itertools.islice(DataLoader(ds, batch_size=None, num_workers=workers), 6))
        assert all(torch.equal(a, b) for a, b in zip(want, got)), workers
    # epochs differ in order, blocks are the same
    e0 = sorted(itertools.chain.from_iterable(ref.block_ids(k).tolist() for k in range(per_epoch)))
    assert len(e0) == len(set(e0))


def test_pipeline_on_a_prepared_directory_and_resume_checks(tmp_path):
    _prepare(tmp_path, make_docs(60))
    out = str(tmp_path / "out")
    cfg = DataConfig(data=out, seq_len=8, batch_size=2, val_batches=2, shuffle=True)
    assert cfg.val_fraction == 0.2 and cfg.tokenizer is None
    pipe = DataPipeline(cfg)
    pipe.setup()
    assert pipe.vocab_size == 257 and pipe.validation_batches().shape == (2, 2, 9)
    big = 10**9  # a position far past the data: reached at once, in a later epoch
    state = pipe.state_dict(big)
    assert pipe.load_state_dict(state) == big
    assert torch.equal(next(iter(pipe.loader(pipe.train_dataset(big)))), pipe.train_dataset().batch(big))
    other = DataPipeline(DataConfig(data=out, seq_len=8, batch_size=4, val_batches=0))
    other.setup()
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        other.load_state_dict(state)
    more_workers = DataPipeline(DataConfig(data=out, seq_len=8, batch_size=2, shuffle=True, num_workers=2))
    more_workers.setup()
    assert more_workers.load_state_dict(state) == big  # batches do not depend on the worker count
    streaming = DataPipeline(DataConfig(data=str(tmp_path / "src"), seq_len=8, batch_size=2, val_batches=0))
    streaming.setup()
    with pytest.raises(ValueError, match="prepared token shards"):
        streaming.load_state_dict(state)
    with pytest.raises(ValueError, match="decided at prepare time"):
        DataConfig(data=out, val_fraction=0.1)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        DataConfig(data=out, shuffle_buffer=4)
    with pytest.raises(ValueError, match="shuffle=True permutes"):
        DataConfig(data=str(tmp_path / "src"), shuffle=True)
    wrong = train_bpe((d["text"] for d in make_docs(20)), 260)
    wrong.save(tmp_path / "wrong.json")
    bad = DataPipeline(DataConfig(data=out, tokenizer=str(tmp_path / "wrong.json")))
    with pytest.raises(ValueError, match="not the tokenizer .* was prepared with"):
        bad.setup()


def test_cli_prepare_and_info(tmp_path, capsys):
    root = write_corpus(tmp_path / "src", make_docs(20), n_shards=2)
    rc = data_main(["prepare", str(root), "--tokenizer", "bytes", "--out", str(tmp_path / "out"), "--no-progress",
                    "--sources", "RedPajamaBook", "--val-fraction", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 10 documents" in out and "10 filtered by source set" in out
    assert data_main(["info", str(tmp_path / "out")]) == 0
    assert "--sources RedPajamaBook" in capsys.readouterr().out
    assert data_main(["info", str(tmp_path / "src")]) == 2
    assert "not a prepared token-shard directory" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resume_from_token_shards(tmp_path, workers):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_lit_datamodule import _fit

    from lightning_optlab.lit.datamodule import LMDataModule

    _prepare(tmp_path, make_docs(40))

    def dm():
        return LMDataModule(data=str(tmp_path / "out"), seq_len=16, batch_size=4, val_batches=2, shuffle=True,
                            num_workers=workers, work_dir=str(tmp_path / "work"))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    straight, seen, trainer = _fit(tmp_path, "a", dm(), 7, callbacks=[ckpt])
    assert len(seen) == 7 and trainer.datamodule.batches_consumed == 7 and "val/loss" in trainer.callback_metrics
    resumed, after, _ = _fit(tmp_path, "b", dm(), 7, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert len(after) == 4 and all(torch.equal(a, b) for a, b in zip(seen[3:], after))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_prepare_from_a_hub_stream_in_chunks(tmp_path, monkeypatch):
    import datasets

    rows = [{"text": f"hub document {i}", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}} for i in range(7)]
    rows.insert(3, {"no_text": 1})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    with pytest.raises(ValueError, match="--allow-download"):
        PrepareConfig(inputs=["hub:cerebras/SlimPajama-627B"], out=str(tmp_path / "o"))
    index = prepare(PrepareConfig(inputs=["hub:cerebras/SlimPajama-627B"], out=str(tmp_path / "o"),
                                  allow_download=True, hub_docs_per_shard=3, val_fraction=0.0, progress=False))
    assert [s["documents"] for s in index["splits"]["train"]["shards"]] == [3, 3, 1]
    assert index["read"]["corrupt_lines"] == 1
    tok = ByteTokenizer()
    stream = TokenShards(tmp_path / "o").tokens(0, index["splits"]["train"]["tokens"]).tolist()
    assert stream == [i for r in rows if "text" in r for i in tok.encode(r["text"]) + [tok.eos_id]]


def test_optlab_data_is_a_subcommand(tmp_path, capsys):
    from lightning_optlab.cli import main

    _prepare(tmp_path)
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    assert "train:" in capsys.readouterr().out
