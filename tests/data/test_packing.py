"""Packing into blocks with end-of-document tokens, the hash split, the shuffle buffer."""

from __future__ import annotations

import random

import pytest

from lightning_optlab.data import document_hash, in_validation, pack_blocks, shuffle_blocks

EOS = 99


def test_hand_example():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 10 11 12 E 13 E  (17 tokens) -> 4 blocks of 4, one token dropped
    assert list(pack_blocks(docs, 4, EOS)) == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, 10], [11, 12, EOS, 13]]


def test_blocks_are_the_eos_joined_stream_cut_in_pieces():
    rng = random.Random(0)
    docs = [[rng.randrange(50) for _ in range(rng.randint(0, 40))] for _ in range(30)]
    stream = [t for d in docs for t in (*d, EOS)]
    for n in (1, 2, 7, 65):
        blocks = list(pack_blocks(docs, n, EOS))
        assert all(len(b) == n for b in blocks)
        assert [t for b in blocks for t in b] == stream[: len(stream) // n * n]


def test_a_document_longer_than_several_blocks():
    assert list(pack_blocks([list(range(10))], 3, EOS)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, EOS]][:3]


def test_block_len_checked():
    with pytest.raises(ValueError, match="block_len must be ≥ 1"):
        list(pack_blocks([[1]], 0, EOS))


def test_hash_split_fraction_and_stability():
    texts = [f"document number {i}" for i in range(20_000)]
    held = [t for t in texts if in_validation(t, 0.1)]
    assert abs(len(held) / len(texts) - 0.1) < 0.01
    assert all(0.0 <= document_hash(t) < 1.0 for t in texts[:100])
    assert not any(in_validation(t, 0.0) for t in texts)
    # nested: a larger fraction keeps every document of a smaller one
    assert set(held) <= {t for t in texts if in_validation(t, 0.2)}
    assert document_hash("same text") == document_hash("same text")


def test_shuffle_buffer_is_a_seeded_permutation():
    blocks = [[i] for i in range(100)]
    a = list(shuffle_blocks(iter(blocks), 16, random.Random(3)))
    assert a == list(shuffle_blocks(iter(blocks), 16, random.Random(3)))
    assert sorted(a) == blocks and a != blocks
    assert a != list(shuffle_blocks(iter(blocks), 16, random.Random(4)))
    assert list(shuffle_blocks(iter(blocks), 0, random.Random(3))) == blocks
    # a block never comes out earlier than buffer_size - 1 places before its arrival
    assert all(pos >= blk[0] - 15 for pos, blk in enumerate(a))
