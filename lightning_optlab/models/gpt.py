"""A GPT-2-style decoder-only language model (plain PyTorch, no Lightning).

Pre-LayerNorm blocks with causal self-attention through ``scaled_dot_product_attention``, a GELU
MLP and learned positions (Radford et al. 2019). Switches: QK-LayerNorm, z-loss coefficient,
tied embeddings, biases, dropout. ``forward`` returns logits; ``loss`` adds the z-loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GPTConfig", "GPT"]


@dataclass(kw_only=True)
class GPTConfig:
    """Size and switches of a GPT-2-style model."""

    #: vocabulary size
    vocab_size: int = 256
    #: context length (learned positions)
    block_size: int = 128
    #: number of transformer blocks
    n_layer: int = 2
    #: attention heads per block
    n_head: int = 4
    #: model width
    n_embd: int = 64
    #: dropout probability on residual branches and attention
    dropout: float = 0.0
    #: biases in linear layers and LayerNorms
    bias: bool = True
    #: tie the readout weight to the token embedding
    tie_embeddings: bool = False
    #: LayerNorm on queries and keys (the studies' "standard" variant)
    qk_layernorm: bool = False
    #: z-loss coefficient (1e-4 in the studies' standard variant; 0 disables)
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be ≥ 0, got {self.z_loss}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        head = cfg.n_embd // cfg.n_head
        self.q_norm = nn.LayerNorm(head, bias=cfg.bias) if cfg.qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(head, bias=cfg.bias) if cfg.qk_layernorm else nn.Identity()
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    """GPT-2-style language model: ``GPT(GPTConfig(...))(idx) -> logits``."""

    optlab_readout = "lm_head"

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: std 0.02 / sqrt(2 · n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy, plus ``z_loss · mean(logsumexp(logits)²)`` when enabled (PaLM)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        ce = F.cross_entropy(flat, targets.reshape(-1))
        if self.config.z_loss > 0:
            ce = ce + self.config.z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
        return ce

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6·N (non-embedding) + 12·L·d·T attention (Kaplan et al. 2020)."""
        n = sum(p.numel() for n_, p in self.named_parameters() if not n_.startswith(("wte", "wpe")))
        c = self.config
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * c.block_size
