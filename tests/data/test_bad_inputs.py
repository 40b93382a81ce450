"""Bad data inputs are reported, not dropped silently: broken shard links, a val_data with no usable document."""

import os

import pytest
import torch
from _shards import make_docs, write_corpus

from lightning_optlab.data.reader import resolve_paths
from lightning_optlab.lit.datamodule import LMDataModule


def test_a_broken_shard_link_is_warned_with_a_count(tmp_path):
    root = write_corpus(tmp_path / "corpus", make_docs(30))
    os.symlink(tmp_path / "gone.jsonl.zst", root / "part_9.jsonl.zst")
    os.symlink(tmp_path / "gone2.jsonl.zst", root / "part_8.jsonl.zst")
    with pytest.warns(UserWarning, match=r"2 shard link\(s\) under .*corpus point to nothing .*part_8.jsonl.zst"):
        files = resolve_paths(root)
    assert [f.name for f in files] == ["part_0.jsonl.zst", "part_1.jsonl.zst", "part_2.jsonl.zst"]


def test_an_all_bad_val_data_says_so_with_the_counts(tmp_path):
    torch.set_num_threads(1)
    root = write_corpus(tmp_path / "corpus", make_docs(60))
    val = tmp_path / "val"
    val.mkdir()
    (val / "val.jsonl").write_text("not json\n{\"text\": \n[1, 2\n")
    dm = LMDataModule(data=str(root), val_data=str(val), tokenizer="bytes", seq_len=16, batch_size=2,
                      val_batches=1, work_dir=str(tmp_path / "work"))
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(RuntimeError) as info:
        next(iter(dm.val_dataloader()))
    msg = str(info.value)
    assert "validation data (val_data) has no usable document" in msg and "3 corrupt line(s)" in msg
    assert "'all'" not in msg and "val.jsonl" in msg
