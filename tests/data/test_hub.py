"""The opt-in hub stream: impossible without allow_download, and the arguments it builds."""

from __future__ import annotations

import datasets
import pytest

from lightning_optlab.data import DataConfig, HubReader, PackedDataset


def test_hub_needs_the_option():
    with pytest.raises(ValueError, match="allow_download=True"):
        HubReader()
    with pytest.raises(ValueError, match="allow_download=True"):
        DataConfig(data="hub:cerebras/SlimPajama-627B")
    with pytest.raises(ValueError, match="allow_download=True"):
        DataConfig(data="/some/shards", val_data="hub:cerebras/SlimPajama-627B", val_fraction=0.0)


def test_hub_stream_arguments_and_records(monkeypatch):
    calls = []
    rows = [{"text": "first", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}},
            {"text": "second", "meta": {"redpajama_set_name": "RedPajamaGithub"}},
            {"no_text": 1},
            {"text": "third", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    reader = HubReader(split="validation", sources=["RedPajamaWikipedia"], allow_download=True,
                       load_kwargs={"revision": "main"})
    assert reader.load_arguments() == (("cerebras/SlimPajama-627B",),
                                       {"split": "validation", "streaming": True, "revision": "main"})
    docs = list(reader)
    assert calls == [reader.load_arguments()]
    assert [d.text for d in docs] == ["first", "third"]
    assert docs[0].path == "hub:cerebras/SlimPajama-627B[validation]" and docs[1].line == 4
    assert reader.stats.corrupt_lines == 1 and reader.stats.filtered == 1
    with pytest.raises(ValueError, match="shard_by='document'"):
        PackedDataset(reader, None, seq_len=4, batch_size=1, shard_by="file")


def test_pipeline_streams_the_hub_when_allowed(monkeypatch):
    from lightning_optlab.data import DataPipeline

    calls = []
    rows = [{"text": f"hub document {i} " * 5, "meta": {"redpajama_set_name": "RedPajamaC4"}} for i in range(40)]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pipe = DataPipeline(DataConfig(data="hub:cerebras/SlimPajama-627B", allow_download=True, seq_len=8, batch_size=2,
                                   val_fraction=0.2, val_batches=1, work_dir="/nonexistent/never/written"))
    pipe.setup()
    batch = next(iter(pipe.loader(pipe.train_dataset())))
    assert batch.shape == (2, 9)
    assert pipe.tokenizer.decode(batch[0].tolist()) == "hub docum"
    assert pipe.validation_batches().shape == (1, 2, 9)
    assert calls and all(c == (("cerebras/SlimPajama-627B",), {"split": "train", "streaming": True}) for c in calls)
