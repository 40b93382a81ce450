"""Tokenizers: a HF ``tokenizers`` file, a byte-level BPE trained on the fly, or raw UTF-8 bytes.

All three are :class:`TextTokenizer` objects with one interface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``eos_id``, ``vocab_size`` and ``save(path)`` (a standard
``tokenizer.json`` that ``tokenizers.Tokenizer.from_file`` — and :func:`load_tokenizer` — reads
back). ``encode`` adds no special tokens; the packer puts ``<|endoftext|>`` after every document.

* :func:`train_bpe` — byte-level BPE (Sennrich et al. 2016 on the byte alphabet of GPT-2,
  Radford et al. 2019): every text is first mapped to bytes, so nothing is out of vocabulary,
  and ``vocab_size - 257`` merges are learned from the given texts.
* :class:`ByteTokenizer` — id = UTF-8 byte value (0..255) plus ``<|endoftext|>`` = 256; encoding
  is pure Python and instant. Its saved file is a merge-free byte-level BPE with the same ids.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["EOS_TOKEN", "TextTokenizer", "ByteTokenizer", "train_bpe", "load_tokenizer", "bytes_to_unicode"]

#: the end-of-document token of every tokenizer built here (GPT-2's name for it)
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 bytes (controls, space, ...) are mapped in order onto ``chr(256)``, ``chr(257)``, ...
    so that byte-level BPE never has to handle whitespace or control characters in its vocabulary.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with an end-of-document token.

    Args:
        tokenizer: the HF ``tokenizers.Tokenizer`` (its ``encode_special_tokens`` is switched on).
        eos_token: the end-of-document token; it must be in the vocabulary.
    """

    def __init__(self, tokenizer, eos_token: str = EOS_TOKEN) -> None:  # noqa: ANN001
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"the tokenizer has no end-of-document token {eos_token!r}; add it as a special "
                             "token or pass eos_token= naming the one it has")
        # Text is text: a literal "<|endoftext|>" inside a document must not become a document
        # boundary (tiktoken refuses it by default for the same reason); only the packer adds eos.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eos_token = eos_token
        self.eos_id: int = eos

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str = EOS_TOKEN) -> TextTokenizer:
        """Load a ``tokenizer.json`` (any HF ``tokenizers`` file)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)), eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self):  # noqa: ANN201
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def fingerprint(self) -> str:
        """sha1 of the tokenizer's JSON: equal fingerprints mean equal tokenizations."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def __getstate__(self) -> dict:
        # tokenizers pickles through its JSON, which omits encode_special_tokens: re-wrap on load
        return {"json": self.to_json(), "eos_token": self.eos_token}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        TextTokenizer.__init__(self, Tokenizer.from_str(state["json"]), state["eos_token"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _byte_level_hf_tokenizer():  # noqa: ANN202
    """A merge-free byte-level BPE whose id of each byte is the byte's value, ``<|endoftext|>`` = 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as tokens (ids 0..255) plus ``<|endoftext|>`` (id 256): vocabulary 257."""

    def __init__(self) -> None:
        self._hf = None
        self.eos_token = EOS_TOKEN
        self.eos_id = 256

    @property
    def _tok(self):  # noqa: ANN202  (built only when saved or fingerprinted)
        if self._hf is None:
            self._hf = _byte_level_hf_tokenizer()
            self._hf.encode_special_tokens = True
        return self._hf

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i == self.eos_id:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(EOS_TOKEN)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"id {i} is outside the byte vocabulary 0..256")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __getstate__(self) -> dict:
        return {}  # nothing to carry into dataloader workers; the HF object is rebuilt on demand

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              length: int | None = None) -> TextTokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` ids (256 bytes, merges, ``<|endoftext|>``).

    Args:
        texts: the training documents (an iterator is consumed once).
        vocab_size: total ids, ≥ 258 (fewer may result when the texts run out of pairs to merge).
        min_frequency: a pair must occur this often to be merged.
        length: number of texts, for the trainer's bookkeeping only.

    Training is deterministic for a given list of texts (checked in the tests).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"BPE vocab_size must be ≥ 258 (256 bytes, <|endoftext|> and at least one merge), "
                         f"got {vocab_size}; use the byte tokenizer for a 257-id vocabulary")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be ≥ 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=length)
    return TextTokenizer(tok)


def load_tokenizer(spec: str | Path) -> TextTokenizer:
    """``"bytes"`` → :class:`ByteTokenizer`; a path → that ``tokenizer.json``."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    return TextTokenizer.from_file(spec)
