"""Configuration of the reference decoder-only language models.

One dataclass, :class:`TransformerConfig`, describes both families; :class:`GPTConfig` and
:class:`LlamaConfig` are the same fields with each family's defaults (the families are presets of
one config class, not two code paths):

* GPT-2 style (Radford et al. 2019): LayerNorm, GELU MLP of width 4·d, learned positions, biases;
* LLaMA style (Touvron et al. 2023): RMSNorm, SwiGLU MLP of width ≈ 8·d/3, rotary positions
  (Su et al. 2021), no biases, untied embeddings, optional grouped-query attention
  (Ainslie et al. 2023).

Every field is validated in ``__post_init__``; ``dataclasses.replace(cfg, field=value)`` builds
a validated variant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

__all__ = ["TransformerConfig", "GPTConfig", "LlamaConfig", "AttnScale"]

#: ``"sqrt"`` (1/sqrt(d_head), Vaswani et al. 2017), ``"inverse"`` (1/d_head, μP) or a number
AttnScale = Union[str, float]

_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")
_POSITIONS = ("learned", "rope")
_ATTN_SCALES = ("sqrt", "inverse")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(kw_only=True)
class TransformerConfig:
    """Size, architecture switches and initialization of a decoder-only language model."""

    # --- size -----------------------------------------------------------------------------
    #: vocabulary size (50304 = GPT-2's 50257 padded to a multiple of 64; 32000 for LLaMA)
    vocab_size: int = 256
    #: context length: the longest sequence ``forward`` accepts (and the learned-position table)
    block_size: int = 128
    #: number of transformer blocks L
    n_layer: int = 2
    #: query heads per block (head size d_head = n_embd / n_head)
    n_head: int = 4
    #: key/value heads (grouped-query attention); None means n_head (multi-head attention)
    n_kv_head: int | None = None
    #: model width d
    n_embd: int = 64
    #: MLP hidden width; None: 4·d for GELU, 8·d/3 rounded up to ``mlp_multiple_of`` for SwiGLU
    mlp_hidden: int | None = None
    #: SwiGLU's default hidden width is rounded up to a multiple of this (LLaMA used 256)
    mlp_multiple_of: int = 64

    # --- architecture ---------------------------------------------------------------------
    #: normalization: "layernorm" (GPT-2) or "rmsnorm" (LLaMA)
    norm: str = "layernorm"
    #: MLP: "gelu" (GPT-2) or "swiglu" (LLaMA)
    mlp: str = "gelu"
    #: positions: "learned" (a table added to the embeddings) or "rope" (rotary, on q and k)
    positions: str = "learned"
    #: rotary base θ (frequencies θ^(-2i/d_head))
    rope_theta: float = 10000.0
    #: ε of every normalization layer
    norm_eps: float = 1e-5
    #: biases in linear layers and LayerNorms
    bias: bool = True
    #: tie the readout weight to the token embedding (one shared tensor)
    tie_embeddings: bool = False
    #: normalize queries and keys per head before the dot product (the studies' "standard" variant)
    qk_layernorm: bool = False
    #: z-loss coefficient: the loss adds z_loss · mean(logsumexp(logits)²) (1e-4 in the studies)
    z_loss: float = 0.0
    #: dropout on embeddings, residual branches and attention weights
    dropout: float = 0.0
    #: attention logit scale: "sqrt" (1/sqrt(d_head)), "inverse" (1/d_head, μP) or a number
    attn_scale: AttnScale = "sqrt"
    #: multiplies the logits (μP's output multiplier, e.g. base_width / width); 1 = plain
    logit_scale: float = 1.0
    #: multiplies every residual branch's output, ``x + residual_scale · f(x)`` (depth-μP / CompleteP's
    #: branch multiplier, (base depth / depth)^α); 1 = plain
    residual_scale: float = 1.0

    # --- initialization -------------------------------------------------------------------
    #: std of the normal init of embeddings and linear weights (GPT-2: 0.02)
    init_std: float = 0.02
    #: residual-branch output projections get std init_std / sqrt(2·n_layer) (GPT-2)
    scale_residual_init: bool = True
    #: the layer count in that init scaling; None: n_layer. A depth rule sets the proxy's depth, so the
    #: branch multiplier alone carries the depth dependence (the init is the proxy's at every depth)
    residual_init_layers: int | None = None
    #: zero-initialize the readout (μP; needs untied embeddings)
    zero_readout: bool = False
    #: zero-initialize the query projections (μP)
    zero_query: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_multiple_of"):
            _check_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among the divisors of n_embd"
            )
        if self.n_kv_head is not None:
            _check_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise ValueError(
                    f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) for "
                    f"grouped-query attention; use a divisor of n_head, or None for one KV head per head"
                )
        if self.mlp_hidden is not None:
            _check_int("mlp_hidden", self.mlp_hidden)
        _check_choice("norm", self.norm, _NORMS)
        _check_choice("mlp", self.mlp, _MLPS)
        _check_choice("positions", self.positions, _POSITIONS)
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got n_embd / n_head = {self.head_dim}")
        if self.residual_init_layers is not None:
            _check_int("residual_init_layers", self.residual_init_layers)
        for name in ("rope_theta", "norm_eps", "init_std", "logit_scale", "residual_scale"):
            _check_positive(name, getattr(self, name))
        if isinstance(self.attn_scale, str):
            _check_choice("attn_scale", self.attn_scale, _ATTN_SCALES)
        else:
            _check_positive("attn_scale", self.attn_scale)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.z_loss, bool) or not isinstance(self.z_loss, (int, float)) or not 0.0 <= self.z_loss < math.inf:
            raise ValueError(f"z_loss must be a finite number ≥ 0 (0 disables it), got {self.z_loss!r}")
        if self.zero_readout and self.tie_embeddings:
            raise ValueError(
                "zero_readout=True with tie_embeddings=True would zero the token embedding; "
                "untie the embeddings (tie_embeddings=False) to zero-initialize the readout"
            )

    @property
    def head_dim(self) -> int:
        """d_head = n_embd / n_head."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head, or n_head when it is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """The MLP hidden width actually built."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        # SwiGLU has three matrices, so 8d/3 keeps its parameters at GELU's 8d² (Shazeer 2020)
        m = self.mlp_multiple_of
        return m * math.ceil(8 * self.n_embd / 3 / m)

    @property
    def softmax_scale(self) -> float:
        """The factor multiplying q·k before the softmax."""
        if self.attn_scale == "sqrt":
            return 1.0 / math.sqrt(self.head_dim)
        if self.attn_scale == "inverse":
            return 1.0 / self.head_dim
        return float(self.attn_scale)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for hyperparameter logging)."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(kw_only=True)
class GPTConfig(TransformerConfig):
    """GPT-2 family defaults: LayerNorm, GELU MLP, learned positions, biases."""

    norm: str = "layernorm"
    mlp: str = "gelu"
    positions: str = "learned"
    bias: bool = True


@dataclass(kw_only=True)
class LlamaConfig(TransformerConfig):
    """LLaMA family defaults: RMSNorm, SwiGLU MLP, rotary positions, no biases, untied embeddings."""

    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    positions: str = "rope"
    bias: bool = False
    tie_embeddings: bool = False
