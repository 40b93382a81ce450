"""Decoder-only language models: ``TransformerLM`` and its two families, ``GPT`` and ``Llama``.

``model(idx) -> logits`` of shape (B, T, V); ``model.loss(logits, targets)`` is the training loss
(float32 cross-entropy plus the optional z-loss); ``model.flops_per_token()`` counts training
FLOPs for throughput/MFU. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import GPTConfig, LlamaConfig, TransformerConfig
from .layers import Block, make_norm, rotary_cos_sin

__all__ = ["TransformerLM", "GPT", "Llama"]


class TransformerLM(nn.Module):
    """A pre-norm decoder-only transformer; the config decides norm, MLP and positions.

    Modules: ``wte`` (token embedding), ``wpe`` (learned positions, only with
    ``positions="learned"``), ``blocks[i]`` (``ln_1``, ``attn.{q,k,v,o}_proj``, ``attn.{q,k}_norm``,
    ``ln_2``, ``mlp.{gate,up,down}_proj``), ``ln_f`` and ``lm_head`` (the readout, weight tied to
    ``wte`` when ``tie_embeddings``). ``optlab_readout`` tells
    :func:`lightning_optlab.params.classify_parameters` which module is the readout.

    Example:
        >>> model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64))
        >>> idx = torch.randint(0, 256, (8, 33))
        >>> logits = model(idx[:, :-1])                  # (8, 32, 256)
        >>> loss = model.loss(logits, idx[:, 1:])
    """

    optlab_readout = "lm_head"

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig (GPTConfig, LlamaConfig), got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, fan_in_mults: Mapping[str, float] | None = None) -> None:
        """(Re-)initialize every parameter; call it after ``to_empty()`` on a meta-built model.

        Linear and embedding weights ~ N(0, init_std²), biases 0, norm weights 1 (GPT-2,
        Radford et al. 2019). With ``scale_residual_init`` the projections writing into the
        residual stream (``attn.o_proj``, ``mlp.down_proj``) get std init_std / sqrt(2·n_layer),
        so the residual stream's variance stays O(1) over the 2·n_layer branches (GPT-2 §2.3);
        ``residual_init_layers``, when set, replaces n_layer there (a depth rule: the proxy's depth).
        μP options (Yang et al. 2022, Tensor Programs V, §D.2): ``zero_readout`` and ``zero_query``
        zero the readout and the query projections; ``fan_in_mults`` (``{parameter name: fan-in
        width multiplier}``, as :func:`lightning_optlab.mup.set_base_shapes` derives it) divides the
        std of the named hidden matrices by sqrt(multiplier): variance ∝ 1/fan_in, equal to the plain
        init at the base width (Tensor Programs V, Table 3).
        """
        cfg = self.config
        mults = dict(fan_in_mults or {})
        unknown = sorted(set(mults) - {n for n, _ in self.named_parameters()})
        if unknown:
            raise ValueError(f"fan_in_mults names unknown parameters {unknown[:3]}; names look like 'blocks.0.attn.q_proj.weight'")
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        layers = cfg.n_layer if cfg.residual_init_layers is None else cfg.residual_init_layers
        for block in self.blocks:
            if cfg.scale_residual_init:
                for proj in block.residual_projections():
                    nn.init.normal_(proj.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * layers))
            if cfg.zero_query:
                nn.init.zeros_(block.attn.q_proj.weight)
        for name, p in self.named_parameters():
            if name in mults and mults[name] != 1.0:
                p.mul_(1.0 / math.sqrt(mults[name]))
        if cfg.zero_readout:
            nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) with T ≤ block_size → logits (B, T, vocab_size)."""
        cfg = self.config
        t = idx.shape[-1]
        if t > cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {cfg.block_size}; "
                             f"build the model with block_size ≥ {t} or feed shorter sequences")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x))
        return logits * cfg.logit_scale if cfg.logit_scale != 1.0 else logits

    def loss(self, logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean cross-entropy in float32 (or float64 logits' own dtype), plus ``z_loss · mean(logsumexp(logits)²)`` when z_loss > 0.

        The z-loss (PaLM, Chowdhery et al. 2022, §5) pushes log Z towards 0 to keep the softmax
        normalizer from drifting. Targets equal to ``ignore_index`` count in neither mean.
        """
        flat = logits.reshape(-1, logits.shape[-1])
        flat = flat.float() if flat.element_size() < 4 else flat  # at least float32 (float64 stays float64)
        flat_targets = targets.reshape(-1)
        ce = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index)
        if self.config.z_loss > 0:
            keep = (flat_targets != ignore_index).to(flat.dtype)
            lse_sq = torch.logsumexp(flat, dim=-1).pow(2)
            ce = ce + self.config.z_loss * (lse_sq * keep).sum() / keep.sum().clamp_min(1.0)
        return ce

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied tensor counted once; ``exclude_embeddings`` drops wte and wpe (Kaplan et al. 2020)."""
        skip = {id(self.wte.weight)} | ({id(self.wpe.weight)} if self.wpe is not None else set())
        return sum(p.numel() for p in self.parameters() if not (exclude_embeddings and id(p) in skip))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N + 12·L·n_head·d_head·T (PaLM, Chowdhery et al. 2022, App. B).

        N counts the parameters that take part in matrix multiplies: every parameter except the
        embedding tables, plus the readout matrix even when tied to the token embedding (its
        matmul is real work). 6 = 2 (multiply-add) × 3 (forward + two backward matmuls). The
        attention term counts q·kᵀ and attention·v over the full T×T score matrix (causal
        masking is not subtracted, as in PaLM's and nanoGPT's MFU), T = ``seq_len`` or block_size.
        """
        cfg = self.config
        n = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        t = cfg.block_size if seq_len is None else seq_len
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * t

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of every block, in order."""
        return [block.attn for block in self.blocks]


class GPT(TransformerLM):
    """GPT-2-style language model (LayerNorm, GELU MLP, learned positions): ``GPT(GPTConfig(...))(idx)``.

    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners". The architecture
    follows the config given; ``GPT()`` builds the tiny default ``GPTConfig()``.
    """

    def __init__(self, config: TransformerConfig | None = None) -> None:
        super().__init__(GPTConfig() if config is None else config)


class Llama(TransformerLM):
    """LLaMA-style language model (RMSNorm, SwiGLU, rotary positions, optional GQA).

    Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models". The architecture
    follows the config given; ``Llama()`` builds the tiny default ``LlamaConfig()``.
    """

    def __init__(self, config: TransformerConfig | None = None) -> None:
        super().__init__(LlamaConfig() if config is None else config)
