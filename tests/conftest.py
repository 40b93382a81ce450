"""Shared fixtures: tiny models with the parameter roles of a language model."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyAttention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = (f(x).view(b, t, h, d // h).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class TinyBlock(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = TinyAttention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """A two-block decoder with every parameter role: embedding, hidden, readout, norm, bias."""

    def __init__(self, vocab: int = 17, d: int = 8, n_heads: int = 2, n_layers: int = 2, seq: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.vocab = vocab
        self.seq = seq

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self(idx[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab), idx[:, 1:].reshape(-1))


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def lm_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # a learnable pattern: each sequence counts up modulo the vocabulary
    start = torch.randint(0, 17, (8, 1), generator=g)
    return (start + torch.arange(7)) % 17
