"""Adam-mini (Zhang et al. 2024): Adam with one second-moment scalar per Hessian block.

The update is Adalayer's block-shared second moment (:func:`.adalayer.block_adam_`); what is
specific here is how a transformer's parameters are cut into blocks, from their names.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ._validate import check_positive_int
from .adalayer import BlockAdamBase, BlockAdamHParams, Layout, coordinate_layout, row_layout, tensor_layout

__all__ = ["AdamMini", "DEFAULT_PATTERNS"]

_B, _E = r"(?:^|[._])", r"(?:[._]|$)"  # a pattern must match whole name components

#: default name patterns (``re.search``, case-insensitive), GPT-2 and LLaMA naming
DEFAULT_PATTERNS: dict[str, str] = {
    "query_pattern": _B + r"(?:q_proj|wq|query)" + _E,
    "key_pattern": _B + r"(?:k_proj|wk|key)" + _E,
    # concatenated [Q; K; V] rows
    "qkv_pattern": _B + r"(?:c_attn|qkv_proj|qkv|wqkv|in_proj_weight)" + _E,
    # per-head interleaved [q_h; k_h; v_h] rows (GPT-NeoX, BLOOM); checked before query_pattern,
    # whose "query" would otherwise match inside "query_key_value"
    "interleaved_qkv_pattern": _B + r"query_key_value" + _E,
    "embedding_pattern": _B + r"(?:wte|embed_tokens|tok_embeddings|embed|embd|embedding|word_embeddings)" + _E,
    "readout_pattern": _B + r"(?:lm_head|output|final_layer)" + _E,
}
# The adam-mini package (v1.1.1) runs every parameter whose name contains "bias" as plain Adam.
_BIAS = re.compile(r"bias", re.IGNORECASE)


class AdamMini(BlockAdamBase):
    r"""Adam-mini: Adam with one second-moment scalar per block, blocks cut by the Hessian's structure.

    .. math::
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{i\in b}\, g_i^2,\quad
        W_i \leftarrow W_i - \eta\lambda W_i - \eta\,\hat m_i / (\sqrt{\hat v_b} + \epsilon)

    with Adam's per-coordinate first moment and bias corrections, decoupled weight decay as
    ``torch.optim.AdamW``. Blocks, decided from the parameter's name (``re.search``,
    case-insensitive) and its group's ``"role"``, first rule that applies:

    1. name contains ``bias``: one block per coordinate (plain Adam), as the ``adam-mini``
       package does for biases;
    2. other 0-/1-D parameters (norm weights, scalars): one block per tensor, as the package's
       default branch does for LayerNorm/RMSNorm weights;
    3. role ``embedding``/``readout`` or an embedding/readout name: one block per token (row);
    4. a fused QKV weight (``qkv_pattern``), rows ``[Q; K; V]``: one block per head for the Q and
       K rows, one per row for the V rows (head size = rows / (n_heads + 2·n_kv_heads)); a
       per-head interleaved one (``interleaved_qkv_pattern``, GPT-NeoX's ``query_key_value``:
       rows ``[q_1; k_1; v_1; q_2; ...]``, n_kv_heads = n_heads): the same blocks, in that order;
    5. a query (key) weight: one block per head, ``head_dim`` consecutive rows
       (head_dim = rows / n_heads, or rows / n_kv_heads for keys);
    6. every other ≥ 2-D weight (value, attention output, MLP): one block per output neuron (row).

    Weights are laid out ``(out_features, in_features)`` as ``nn.Linear`` stores them (not
    HF GPT-2's transposed ``Conv1D``). Names come from the group's ``"param_names"`` (torch ≥ 2.6
    stores them when given ``named_parameters()``); **without names**, ≥ 2-D tensors get one block
    per row, 1-D tensors one block per tensor (per coordinate if the group's role is ``"bias"``).
    Where this departs from the package (v1.1.1): the package uses one block for a whole weight
    whose name matches none of its keywords (e.g. GPT-2's ``c_attn``, ``attn.c_proj``), here
    they follow rules 4 and 6; the package sets weight decay to 0 for names containing
    ``norm``/``ln``/``bias``, here the group's ``weight_decay`` applies (the configurator decides).

    Args:
        params: parameters, ``(name, tensor)`` pairs, or param-group dicts.
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.95)).
        eps: ε added to ``sqrt(v̂_b)`` (default 1e-8).
        weight_decay: decoupled weight decay λ (default 0).
        n_heads: attention heads (needed when a query/key/QKV weight is present).
        n_kv_heads: key/value heads for grouped-query attention (default ``n_heads``).
        query_pattern, key_pattern, qkv_pattern, interleaved_qkv_pattern, embedding_pattern,
            readout_pattern: regexes for those names (defaults in :data:`DEFAULT_PATTERNS`:
            ``q_proj``/``wq``/``query``, ``k_proj``/``wk``/``key``,
            ``c_attn``/``qkv_proj``/``wqkv``/``in_proj_weight``, ``query_key_value``,
            ``wte``/``embed_tokens``/``tok_embeddings``, ``lm_head``/``output``).

    State: ``exp_avg`` (one float per parameter) + one float per block.

    Example:
        >>> opt = AdamMini(model.named_parameters(), lr=3e-4, n_heads=12)  # doctest: +SKIP

    Paper: Zhang, Chen, Li, Ding, Wu, Kingma, Ye, Luo, Sun, "Adam-mini: Use Fewer Learning Rates
    To Gain More", ICLR 2025 (arXiv 2406.16793).
    """

    hparams_class = BlockAdamHParams
    constructor_options = ("n_heads", "n_kv_heads", *DEFAULT_PATTERNS)

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        query_pattern: str = DEFAULT_PATTERNS["query_pattern"],
        key_pattern: str = DEFAULT_PATTERNS["key_pattern"],
        qkv_pattern: str = DEFAULT_PATTERNS["qkv_pattern"],
        interleaved_qkv_pattern: str = DEFAULT_PATTERNS["interleaved_qkv_pattern"],
        embedding_pattern: str = DEFAULT_PATTERNS["embedding_pattern"],
        readout_pattern: str = DEFAULT_PATTERNS["readout_pattern"],
        nonfinite: str = "ignore",
    ) -> None:
        BlockAdamHParams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nonfinite=nonfinite)
        if n_heads is not None:
            check_positive_int("n_heads", n_heads)
        if n_kv_heads is not None:
            check_positive_int("n_kv_heads", n_kv_heads)
            if n_heads is None or n_heads % n_kv_heads:
                raise ValueError(f"n_kv_heads must divide n_heads, got n_kv_heads={n_kv_heads}, n_heads={n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self._patterns = {
            key: _compile(key, pattern)
            for key, pattern in (
                ("query_pattern", query_pattern),
                ("key_pattern", key_pattern),
                ("qkv_pattern", qkv_pattern),
                ("interleaved_qkv_pattern", interleaved_qkv_pattern),
                ("embedding_pattern", embedding_pattern),
                ("readout_pattern", readout_pattern),
            )
        }
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nonfinite=nonfinite))

    def _matches(self, key: str, name: str) -> bool:
        return self._patterns[key].search(name) is not None

    def _layout(self, p: Tensor, group: dict[str, Any], name: str | None) -> Layout:
        role = group.get("role")
        if p.numel() == 0:
            return ()
        if (name is not None and _BIAS.search(name)) or (name is None and role == "bias"):
            return coordinate_layout(p)
        if p.dim() < 2:
            return tensor_layout(p)
        if getattr(p, "optlab_in_out", False):  # HF Conv1D: rows are input features, blocks would cut across neurons
            raise ValueError(
                f"{name or 'a parameter'!r} is stored (in_features, out_features) (Hugging Face's Conv1D), but Adam-mini's "
                "blocks are rows of (out_features, in_features) weights: call lightning_optlab.params.conv1d_to_linear(model) "
                "first (exact: the same function with nn.Linear layers), or give this role to another optimizer through mix")
        if name is None or role in ("embedding", "readout"):
            return row_layout(p)
        if self._matches("embedding_pattern", name) or self._matches("readout_pattern", name):
            return row_layout(p)
        if self._matches("qkv_pattern", name):
            return self._qkv_layout(p, name)
        if self._matches("interleaved_qkv_pattern", name):
            return self._interleaved_qkv_layout(p, name)
        if self._matches("query_pattern", name):
            return self._head_layout(p, name, self.n_heads, "n_heads")
        if self._matches("key_pattern", name):
            return self._head_layout(p, name, self.n_kv_heads, "n_kv_heads")
        return row_layout(p)

    def _head_layout(self, p: Tensor, name: str, heads: int | None, what: str) -> Layout:
        rows = p.shape[0]
        if heads is None:
            raise ValueError(f"{name!r} is a query/key weight: pass n_heads (and n_kv_heads for grouped-query attention; "
                             "in a config: optimizer.hparams.n_heads)")
        if rows % heads:
            raise ValueError(f"{name!r} has {rows} rows, not divisible by {what}={heads}; check n_heads/n_kv_heads")
        return ((heads, p.numel() // heads),)

    def _qkv_layout(self, p: Tensor, name: str) -> Layout:
        if self.n_heads is None:
            raise ValueError(f"{name!r} is a fused QKV weight: pass n_heads (and n_kv_heads for grouped-query attention; "
                             "in a config: optimizer.hparams.n_heads)")
        nq, nkv = self.n_heads, self.n_kv_heads
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        if rows % (nq + 2 * nkv):
            raise ValueError(
                f"{name!r} has {rows} rows, not (n_heads + 2·n_kv_heads)·head_dim for n_heads={nq}, "
                f"n_kv_heads={nkv}; check n_heads/n_kv_heads or qkv_pattern"
            )
        head_dim = rows // (nq + 2 * nkv)
        return ((nq + nkv, head_dim * cols), (nkv * head_dim, cols))

    def _interleaved_qkv_layout(self, p: Tensor, name: str) -> Layout:
        if self.n_heads is None:
            raise ValueError(f"{name!r} is a fused QKV weight: pass n_heads (in a config: optimizer.hparams.n_heads)")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"{name!r} is a per-head interleaved QKV weight, which has n_kv_heads = n_heads; got "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} (for a [Q; K; V] layout set qkv_pattern)"
            )
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        if rows % (3 * self.n_heads):
            raise ValueError(f"{name!r} has {rows} rows, not 3·n_heads·head_dim for n_heads={self.n_heads}; check n_heads")
        head_dim = rows // (3 * self.n_heads)
        return ((2, head_dim * cols), (head_dim, cols)) * self.n_heads


def _compile(key: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except (re.error, TypeError) as err:
        raise ValueError(f"{key} must be a valid regular expression, got {pattern!r}: {err}") from None
