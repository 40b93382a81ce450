"""Adalayer (Zhao et al. 2025): Adam with one second-moment scalar per block of parameters.

The block-shared second moment is also the core of Adam-mini (:mod:`.adam_mini`), which reuses
the kernel and the base class here with its own rule for cutting blocks.

A *block layout* is a tuple of segments ``((n_blocks, block_size), ...)`` that tile the
row-major flattened parameter in order; every segment is viewed as an ``(n_blocks, block_size)``
matrix with one block per row. One block per tensor is ``((1, numel),)``, one per row of a
``(rows, cols)`` matrix ``((rows, cols),)``, one per coordinate (Adam) ``((numel, 1),)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ._validate import check_betas, check_eps, check_lr, check_positive_int, check_weight_decay, rollback_group
from .base import HParams, OptlabOptimizer, Traits, check_choice
from .health import HealthMixin, diagonal_stats, quantile_stats

__all__ = [
    "Adalayer",
    "AdalayerHParams",
    "BlockAdamHParams",
    "BlockAdamBase",
    "Layout",
    "block_adam_",
    "coordinate_layout",
    "expand_blocks",
    "n_blocks",
    "row_layout",
    "tensor_layout",
]

#: consecutive segments ``(n_blocks, block_size)`` of a flattened parameter
Layout = tuple[tuple[int, int], ...]

BLOCK_MODES = ("tensor", "row", "coordinate")


def tensor_layout(p: Tensor) -> Layout:
    """One block for the whole tensor."""
    return ((1, p.numel()),) if p.numel() else ()


def coordinate_layout(p: Tensor) -> Layout:
    """One block per coordinate: Adam's own second moment."""
    return ((p.numel(), 1),) if p.numel() else ()


def row_layout(p: Tensor) -> Layout:
    """One block per index of the first dimension (a row of a matrix); a vector: per coordinate."""
    if p.numel() == 0:
        return ()
    if p.dim() == 0:
        return ((1, 1),)
    return ((p.shape[0], p.numel() // p.shape[0]),)


def n_blocks(layout: Layout) -> int:
    """Number of blocks (second-moment scalars) of a layout."""
    return sum(nb for nb, _ in layout)


def split_blocks(flat: Tensor, layout: Layout, *, scalar: bool = False) -> list[Tensor]:
    """Views of a flat tensor, one ``(n_blocks, block_size)`` matrix per segment.

    With ``scalar=True`` ``flat`` holds one value per block and the views are ``(n_blocks, 1)``.
    """
    if len(layout) == 1:  # the common case: no slicing
        nb, bs = layout[0]
        return [flat.view(nb, 1 if scalar else bs)]
    out, off = [], 0
    for nb, bs in layout:
        size = nb if scalar else nb * bs
        out.append(flat[off : off + size].view(nb, 1 if scalar else bs))
        off += size
    return out


def expand_blocks(values: Tensor, layout: Layout, shape: Sequence[int]) -> Tensor:
    """Per-block ``values`` (one per block, in layout order) broadcast to a full tensor of ``shape``."""
    parts = [seg.expand(nb, bs).reshape(-1) for (nb, bs), seg in zip(layout, split_blocks(values, layout, scalar=True))]
    full = torch.cat(parts) if parts else values.new_zeros(0)
    return full.view(shape)


def _block_sq_norms(grads: list[Tensor], sizes: list[int]) -> list[Tensor]:
    """Per-block ``sqrt(Σ g²)`` as ``(n_blocks, 1)`` tensors (the gradient itself for size-1 blocks)."""
    out: list[Tensor | None] = [None] * len(grads)
    whole, whole_idx = [], []
    for i, (g, bs) in enumerate(zip(grads, sizes)):
        if bs == 1:
            out[i] = g
        elif g.shape[0] == 1:  # one block: batched into a single foreach norm below
            whole.append(g.view(-1))
            whole_idx.append(i)
        else:
            out[i] = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    if whole:
        for i, norm in zip(whole_idx, torch._foreach_norm(whole)):
            out[i] = norm.view(1, 1)
    return out  # type: ignore[return-value]


def block_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    block_sqs: list[Tensor],
    steps: list[int],
    v_steps: list[int],
    update_v: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    r"""One in-place step of Adam with a second moment shared by each block.

    For each block :math:`b` (one row of each ``(n_blocks, block_size)`` entry):

    .. math::
        m_i &\leftarrow \beta_1 m_i + (1-\beta_1) g_i \\
        v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\,\tfrac{1}{|b|}\textstyle\sum_{i\in b} g_i^2 \\
        W_i &\leftarrow W_i - \eta\lambda W_i
              - \eta\,\frac{m_i / (1-\beta_1^t)}{\sqrt{v_b / (1-\beta_2^{t_v})} + \epsilon}

    ``params``, ``grads``, ``exp_avgs`` are ``(n_blocks, block_size)`` views, ``block_sqs`` the
    matching ``(n_blocks, 1)`` views of ``v``; ``steps`` is ``t`` (already incremented) and
    ``v_steps`` is ``t_v`` per entry; entries with ``update_v`` false keep ``v`` as it is (frozen
    Adalayer, where ``t_v`` is the step at which ``v`` froze). Block size 1 is exactly Adam(W).
    """
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if all(update_v):
        upd = range(len(params))
    else:
        upd = [i for i, u in enumerate(update_v) if u]
    if upd:
        vs = [block_sqs[i] for i in upd]
        sizes = [params[i].shape[1] for i in upd]
        norms = _block_sq_norms([grads[i] for i in upd], sizes)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, norms, norms, [(1 - beta2) / bs for bs in sizes])
    denoms = torch._foreach_sqrt(block_sqs)
    torch._foreach_div_(denoms, _scalars([math.sqrt(1 - beta2**tv) for tv in v_steps]))
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, _scalars([-lr / (1 - beta1**t) for t in steps]))


def _scalars(values: list[float]) -> float | list[float]:
    """One scalar when all agree (the usual case: cheaper than a scalar list on torch's slow path)."""
    first = values[0]
    return first if all(v == first for v in values) else values


@dataclass(kw_only=True)
class BlockAdamHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-3
    #: (β1, β2) for the first and block second moments, each in [0, 1)
    betas: tuple[float, float] = (0.9, 0.95)
    #: ε added to sqrt(v̂_b) (> 0)
    eps: float = 1e-8
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)


@dataclass(kw_only=True)
class AdalayerHParams(BlockAdamHParams):
    #: block mode "tensor", "row" or "coordinate"; None: from the group's role
    block: Optional[str] = None
    #: keep the group adaptive (True), freeze it (False), or decide from the role (None)
    adaptive: Optional[bool] = None
    #: freeze the non-adaptive denominators after this many steps (integer ≥ 1); None: never
    freeze_after: Optional[int] = None

    def check(self) -> None:
        super().check()
        _check_block(self.block)
        _check_freeze_after(self.freeze_after)
        if self.adaptive is not None:
            check_choice("adaptive", self.adaptive, (None, True, False))


class BlockAdamBase(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """Shared machinery of the block-second-moment optimizers: state, groups, step, health.

    Subclasses define ``_layout(p, group, name) -> Layout`` and may define
    ``_freeze_step(group) -> int | None`` (the step after which ``v`` stops updating).
    State per parameter: ``exp_avg`` (parameter-shaped), ``block_exp_avg_sq`` (one value per
    block), ``step`` (int) and ``blocks`` (the layout, fixed at the first step).
    """

    hparams_class = BlockAdamHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("eps",), whole_tensors=True)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._view_cache: dict[Tensor, tuple] = {}
        super().__init__(params, defaults)

    def _layout(self, p: Tensor, group: dict[str, Any], name: str | None) -> Layout:
        raise NotImplementedError

    def _freeze_step(self, group: dict[str, Any]) -> int | None:
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        with rollback_group(self):  # a rejected group is not kept
            group = self.param_groups[-1]
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):  # build every layout once: bad names/shapes fail here
                self._checked_layout(p, group, names[j] if names is not None and j < len(names) else None)

    def _checked_layout(self, p: Tensor, group: dict[str, Any], name: str | None) -> Layout:
        layout = self._layout(p, group, name)
        if sum(nb * bs for nb, bs in layout) != p.numel():  # a bug in a layout rule, not user error
            raise RuntimeError(f"block layout {layout} does not tile parameter {name!r} of shape {tuple(p.shape)}")
        return layout

    def _init_state(self, p: Tensor, group: dict[str, Any], name: str | None, state: dict[str, Any]) -> None:
        if not p.is_contiguous():
            raise ValueError(
                f"{type(self).__name__} needs contiguous parameters; {name or 'a parameter'} of shape "
                f"{tuple(p.shape)} is not: make it contiguous before building the optimizer"
            )
        layout = self._checked_layout(p, group, name)
        state["step"] = 0
        state["blocks"] = layout
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["block_exp_avg_sq"] = p.new_zeros(n_blocks(layout))

    def _update(self) -> None:
        for group in self.param_groups:
            self._step_group(group)

    def _views(self, p: Tensor, state: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Block views of ``p``, ``exp_avg`` and ``block_exp_avg_sq``, cached across steps.

        Building views costs about a microsecond each, more than the rest of the per-parameter
        bookkeeping, so they are kept; the cache is checked against the state tensors (replaced by
        ``load_state_dict``) and the parameter's storage (``p.data = ...``) on every step.
        """
        m, v = state["exp_avg"], state["block_exp_avg_sq"]
        entry = self._view_cache.get(p)
        if entry is None or entry[0] is not m or entry[1] is not v or entry[2] != p.data_ptr():
            layout = state["blocks"]
            entry = (
                m, v, p.data_ptr(),
                split_blocks(p.view(-1), layout), split_blocks(m.view(-1), layout), split_blocks(v, layout, scalar=True),
            )  # fmt: skip
            self._view_cache[p] = entry
        return entry[3], entry[4], entry[5]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._view_cache = {}

    def _step_group(self, group: dict[str, Any]) -> None:
        freeze = self._freeze_step(group)
        names = group.get("param_names")
        ps: list[Tensor] = []
        gs: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        steps: list[int] = []
        v_steps: list[int] = []
        update_v: list[bool] = []
        for j, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, group, names[j] if names is not None and j < len(names) else None, state)
            t = state["step"] = state["step"] + 1
            p_segs, m_segs, v_segs = self._views(p, state)
            layout = state["blocks"]
            if len(layout) == 1 and grad.is_contiguous():
                gs.append(grad.view(layout[0]))
            else:
                gs += split_blocks(grad.reshape(-1), layout)
            ps += p_segs
            ms += m_segs
            vs += v_segs
            k = len(layout)
            steps += [t] * k
            v_steps += [t if freeze is None else min(t, freeze)] * k
            update_v += [freeze is None or t <= freeze] * k
        beta1, beta2 = group["betas"]
        block_adam_(
            ps, gs, ms, vs, steps, v_steps, update_v,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        )  # fmt: skip

    def _extra_health(self, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        return {}

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        t = state.get("step", 0)
        if t == 0 or p.numel() == 0:
            return {}
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), group["eps"]
        freeze = self._freeze_step(group)
        tv = t if freeze is None else min(t, freeze)
        layout = state["blocks"]
        sqrt_v_hat = (state["block_exp_avg_sq"].float() / (1 - beta2**tv)).sqrt()
        out = quantile_stats("block_eff_lr", lr / (sqrt_v_hat + eps))
        full = expand_blocks(sqrt_v_hat, layout, p.shape)
        out.update(diagonal_stats(p, lr, full, eps, state["exp_avg"] / (1 - beta1**t)))
        out["n_blocks"] = float(n_blocks(layout))
        out.update(self._extra_health(group, state))
        return out


class Adalayer(BlockAdamBase):
    r"""Adalayer: Adam whose second moment is one scalar per block (a tensor, or a readout row).

    .. math::
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{i\in b}\, g_i^2,\quad
        W_i \leftarrow W_i - \eta\lambda W_i - \eta\,\hat m_i / (\sqrt{\hat v_b} + \epsilon)

    with Adam's per-coordinate first moment ``m`` and bias corrections. Blocks: one per parameter
    tensor, except in a group whose ``"role"`` is ``"readout"`` (the key the configurator sets),
    where each row of the ``(vocab × width)`` weight — the weights feeding one logit — is a block
    (a 1-D readout bias: one block per coordinate). The group option ``block`` overrides this:
    ``"tensor"``, ``"row"`` or ``"coordinate"`` (the last is exactly AdamW).

    Frozen Adalayer (``freeze_after=k``): ``v`` is updated during the first ``k`` steps only; from
    then on every block's denominator stays at ``sqrt(v̂_b) + ε`` as it was after step ``k`` (its
    bias correction frozen too), so the per-block effective learning rate is
    ``η_t / (sqrt(v̂_b(k)) + ε)``: the frozen quantity is the ratio to ``η``, and a learning-rate
    schedule still scales it. Groups with role ``"readout"`` or ``"norm"`` stay adaptive (group
    option ``adaptive``: ``True`` keeps any group adaptive, ``False`` freezes even those). The
    momentum ``m`` always keeps updating. The SGD + Adalayer hybrids of the paper are a per-role
    optimizer mix in the configurator, not a flag here.

    Args:
        params: parameters, ``(name, tensor)`` pairs, or param-group dicts (group keys ``role``,
            ``block``, ``adaptive``, ``freeze_after`` and the hyperparameters below are honoured).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) for the first and block second moments (default (0.9, 0.95)).
        eps: ε added to ``sqrt(v̂_b)`` (default 1e-8).
        weight_decay: decoupled weight decay λ, applied as ``W ← W − ηλW`` (default 0).
        block: default block mode for every group, ``None`` to choose from the group's role.
        freeze_after: freeze the non-adaptive denominators after this many steps (default
            ``None``: never).

    State: ``exp_avg`` (one float per parameter) + one float per block.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Adalayer(model.parameters(), lr=1e-3, freeze_after=1000)
        >>> model(torch.randn(2, 4)).sum().backward(); opt.step()

    Paper: Zhao, Morwani, Brandfonbrener, Vyas, Kakade, "Deconstructing What Makes a Good
    Optimizer for Autoregressive Language Models", ICLR 2025 (arXiv 2407.07972).
    """

    hparams_class = AdalayerHParams
    group_only = ("adaptive",)

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        block: str | None = None,
        freeze_after: int | None = None,
        nonfinite: str = "ignore",
    ) -> None:
        AdalayerHParams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block=block,
                        freeze_after=freeze_after, nonfinite=nonfinite)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            block=block, adaptive=None, freeze_after=freeze_after, nonfinite=nonfinite,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _layout(self, p: Tensor, group: dict[str, Any], name: str | None) -> Layout:
        mode = group["block"] or ("row" if group.get("role") == "readout" else "tensor")
        if mode == "row":
            return row_layout(p)
        if mode == "coordinate":
            return coordinate_layout(p)
        return tensor_layout(p)

    def _freeze_step(self, group: dict[str, Any]) -> int | None:
        adaptive = group["adaptive"]
        if adaptive is None:
            adaptive = group.get("role") in ("readout", "norm")
        return None if adaptive else group["freeze_after"]

    def _extra_health(self, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        freeze = self._freeze_step(group)
        return {"frozen": float(freeze is not None and state["step"] >= freeze)}


def _check_block(block: Any) -> None:
    if block is not None and block not in BLOCK_MODES:
        raise ValueError(f"block must be one of {', '.join(map(repr, BLOCK_MODES))} or None (from the role), got {block!r}")


def _check_freeze_after(freeze_after: Any) -> None:
    if freeze_after is not None:
        check_positive_int("freeze_after", freeze_after)
