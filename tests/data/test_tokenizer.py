"""Tokenizers: bytes, a BPE trained on the embedded corpus, tokenizer.json files."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lightning_optlab.data import EOS_TOKEN, ByteTokenizer, TextTokenizer, embedded_corpus, load_tokenizer, train_bpe
from lightning_optlab.data.tokenizer import bytes_to_unicode

SAMPLES = ["Hello, world!", "  leading spaces\tand tabs\n\nnew lines  ", "naïve café — ∑ xᵢ² ☃ 😀", "",
           "<|endoftext|>"]


@pytest.fixture(scope="module")
def bpe():
    texts = [text for _, text in embedded_corpus()]
    return train_bpe(texts, 1024)


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    for s in SAMPLES:
        assert tok.encode(s) == list(s.encode("utf-8"))
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_saved_byte_tokenizer_gives_the_same_ids(tmp_path):
    path = ByteTokenizer().save(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))  # a standard tokenizers file
    loaded = load_tokenizer(path)
    assert loaded.vocab_size == 257 and loaded.eos_id == 256 and hf.token_to_id(EOS_TOKEN) == 256
    for s in SAMPLES:
        assert loaded.encode(s) == list(s.encode("utf-8"))
        assert loaded.decode(loaded.encode(s)) == s
    assert load_tokenizer("bytes").encode("é") == [0xC3, 0xA9]


def test_bytes_to_unicode_matches_the_byte_level_alphabet():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ"  # GPT-2's well-known space marker


def test_bpe_on_the_embedded_corpus_round_trips(bpe, tmp_path):
    assert bpe.vocab_size == 1024
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    text = embedded_corpus()[5][1]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < 0.45 * len(text.encode("utf-8"))  # it learned merges: well under one id per byte
    for s in SAMPLES:
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.eos_id not in bpe.encode("<|endoftext|>")  # text is text; special tokens only from the packer
    reloaded = load_tokenizer(bpe.save(tmp_path / "tokenizer.json"))
    assert reloaded.encode(text) == ids and reloaded.fingerprint() == bpe.fingerprint()
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]


def test_tokenizers_pickle_for_worker_processes(bpe):
    import pickle

    for tok in (bpe, ByteTokenizer()):
        copy = pickle.loads(pickle.dumps(tok))
        assert type(copy) is type(tok) and copy.eos_id == tok.eos_id
        for s in SAMPLES:  # including the literal "<|endoftext|>", which stays text
            assert copy.encode(s) == tok.encode(s)


def test_bpe_training_is_deterministic(bpe):
    texts = [text for _, text in embedded_corpus()]
    assert train_bpe(iter(texts), 1024).fingerprint() == bpe.fingerprint()


def test_bpe_and_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be ≥ 258"):
        train_bpe(["abc"], 257)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextTokenizer.from_file(tmp_path / "missing.json")
    bare = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="no end-of-document token"):
        TextTokenizer(bare)


def test_a_tokenizer_file_with_another_eos_token(tmp_path):
    from tokenizers import AddedToken

    from lightning_optlab.data import DataConfig, DataPipeline

    hf = ByteTokenizer().hf_tokenizer
    hf.add_special_tokens([AddedToken("</s>", special=True)])
    path = tmp_path / "t5ish.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match="no end-of-document token '<\\|endoftext\\|>'|eos_token"):
        DataPipeline(DataConfig(tokenizer=str(path), eos_token="<eos>", work_dir=str(tmp_path))).setup()
    pipe = DataPipeline(DataConfig(data="embedded", tokenizer=str(path), eos_token="</s>", work_dir=str(tmp_path)))
    pipe.setup()
    assert pipe.tokenizer.eos_id == 257 and pipe.vocab_size == 258
    assert pipe.tokenizer.encode("a</s>") == list(b"a</s>")
