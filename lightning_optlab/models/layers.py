"""Building blocks shared by both model families: norms, rotary positions, attention, MLPs, blocks.

Plain PyTorch; no Lightning. Every linear weight is an ``nn.Linear`` stored ``(out, in)``, with one
matrix per projection (q, k, v, o; gate, up, down), so per-matrix optimizers (Shampoo, SOAP, Muon,
Adalayer) see each projection as its own block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import TransformerConfig

__all__ = [
    "make_norm",
    "rotary_cos_sin",
    "apply_rotary",
    "CausalSelfAttention",
    "GeluMLP",
    "SwiGLUMLP",
    "Block",
]


def make_norm(cfg: TransformerConfig, dim: int) -> nn.Module:
    """LayerNorm (with a bias iff ``cfg.bias``) or RMSNorm over the last ``dim`` features."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, shape ``(len(positions), head_dim / 2)``, float32.

    Pair i of a head (coordinates i and i + head_dim/2) at position m is rotated by the angle
    m·θ^(-2i/head_dim) (RoFormer, Su et al. 2021, eq. 15), so that for rotations R_m, R_n
    ``<R_m q, R_n k> = <q, R_(n-m) k>`` depends on the offset n − m only.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs ``(x[..., i], x[..., i + D/2])`` of ``x`` (…, T, D) by the angles in cos/sin (T, D/2).

    Computed in float32 and cast back, so bfloat16 activations keep accurate angles. The half-split
    pairing (as GPT-NeoX) differs from the paper's interleaved pairs by a fixed permutation of
    the head coordinates, which the learned projections absorb.
    """
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention through ``scaled_dot_product_attention``.

    ``softmax(s · q kᵀ + causal mask) v`` per head with s = ``cfg.softmax_scale``; with
    ``n_kv_head < n_head`` each key/value head serves ``n_head / n_kv_head`` query heads.

    Stability hook: when ``record_max_logit`` is True, the forward also computes
    ``max over batch, heads and causal (query, key) pairs of s · q·k`` — one extra matmul, only
    then — and stores it, detached, in ``max_logit`` (a 0-d float32 tensor).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale
        self.dropout = cfg.dropout
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        # QK-norm normalizes each head's query/key vector (shared weights across heads)
        self.q_norm = make_norm(cfg, self.head_dim) if cfg.qk_layernorm else nn.Identity()
        self.k_norm = make_norm(cfg, self.head_dim) if cfg.qk_layernorm else nn.Identity()
        self.record_max_logit: bool = False
        self.max_logit: Tensor | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.record_max_logit:
            self.max_logit = self._max_logit(q, k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))

    @torch.no_grad()
    def _max_logit(self, q: Tensor, k: Tensor) -> Tensor:
        """max of s·q·k over the causal pairs (key position ≤ query position)."""
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dots = q @ k.transpose(-2, -1)  # in the activations' dtype: half the memory under bf16
        t = q.shape[-2]
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        # s > 0, so max(s·q·k) = s·max(q·k)
        return (dots.masked_fill(future, float("-inf")).amax().float() * self.scale).detach()


class GeluMLP(nn.Module):
    """GPT-2's MLP: ``down(gelu(up(x)))`` (exact erf GELU, Hendrycks & Gimpel 2016)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class SwiGLUMLP(nn.Module):
    """LLaMA's MLP: ``down(silu(gate(x)) ⊙ up(x))`` (SwiGLU, Shazeer 2020)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + s·attn(norm(x))``, then ``x + s·mlp(norm(x))``, s = ``cfg.residual_scale``
    (1 in the plain model; depth-μP's / CompleteP's branch multiplier otherwise)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = SwiGLUMLP(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.residual_scale = float(cfg.residual_scale)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        s = self.residual_scale
        if s == 1.0:  # the plain model, bit for bit
            x = x + self.drop(self.attn(self.ln_1(x), rope))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = x + s * self.drop(self.attn(self.ln_1(x), rope))
        return x + s * self.drop(self.mlp(self.ln_2(x)))

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers that write into the residual stream."""
        return self.attn.o_proj, self.mlp.down_proj
