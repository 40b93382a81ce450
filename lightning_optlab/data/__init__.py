"""Data for language-model training: SlimPajama/C4 shards, tokenizers, packing, resumable streams, token shards.

Plain Python and PyTorch (no Lightning): ``lightning_optlab.lit.LMDataModule`` wraps
:class:`DataPipeline` for Lightning. See ``docs/data.md``.
"""

from .corpus import (
    EMBEDDED_SET_NAME,
    EMBEDDED_SETS,
    SOURCE_SET_NAME,
    embedded_corpus,
    embedded_records,
    parse_embedded,
    stdlib_sources,
    write_embedded_shards,
    write_shards,
)
from .hub import HUB_PREFIX, SLIMPAJAMA_HUB_NAME, HubReader
from .packing import document_hash, in_validation, pack_blocks, shuffle_blocks
from .pipeline import DataConfig, DataPipeline
from .prepare import PrepareConfig, prepare
from .shards import TokenShardDataset, TokenShards, is_prepared, load_index, permute_blocks, token_dtype
from .reader import SHARD_SUFFIXES, Document, ReadStats, ShardReader, resolve_paths
from .stream import PackedDataset, batches_before, split_texts
from .tokenizer import EOS_TOKEN, ByteTokenizer, TextTokenizer, load_tokenizer, train_bpe

__all__ = [
    "DataConfig",
    "DataPipeline",
    "ShardReader",
    "HubReader",
    "Document",
    "ReadStats",
    "resolve_paths",
    "SHARD_SUFFIXES",
    "PackedDataset",
    "batches_before",
    "split_texts",
    "pack_blocks",
    "shuffle_blocks",
    "document_hash",
    "in_validation",
    "TextTokenizer",
    "ByteTokenizer",
    "train_bpe",
    "load_tokenizer",
    "EOS_TOKEN",
    "embedded_corpus",
    "write_shards",
    "write_embedded_shards",
    "EMBEDDED_SET_NAME",
    "SOURCE_SET_NAME",
    "EMBEDDED_SETS",
    "embedded_records",
    "stdlib_sources",
    "parse_embedded",
    "PrepareConfig",
    "prepare",
    "TokenShards",
    "TokenShardDataset",
    "is_prepared",
    "load_index",
    "permute_blocks",
    "token_dtype",
    "HUB_PREFIX",
    "SLIMPAJAMA_HUB_NAME",
]
