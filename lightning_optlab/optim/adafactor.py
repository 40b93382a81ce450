"""Adafactor with momentum (the studies' "Adafactor*"): Adam whose second moment is factored.

Tensors of ≥ 2 dims keep Adafactor's rank-1 factorization of the second moment over their last
two dims (leading dims are a batch of matrices) and a full first moment; tensors of < 2 dims
keep Adam's full second moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from ._validate import check_betas, check_eps, check_lr, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool
from .health import HealthMixin, diagonal_stats

__all__ = ["Adafactor", "AdafactorHParams", "factored_second_moment_", "factored_denominators", "relative_step_size"]

# Adafactor's ε2 in its relative step size: the floor of the parameter scale RMS(W).
_PARAM_SCALE_FLOOR = 1e-3
# On an accelerator, matrices of the same shape with at most this many elements are stacked and
# reduced together: for small matrices the per-tensor kernel launches, not the memory traffic,
# set the step time. On the CPU launches are cheap and the stacking copy is not, so none is made.
_STACK_MAX_NUMEL = 1 << 22
# ... in stacks of at most this many elements, which bounds the temporary memory.
_STACK_MAX_TOTAL = 1 << 25
# Stack CPU tensors too (off; the tests turn it on to check the stacked path without a GPU).
_STACK_ON_CPU = False


def _stack_buckets(keys: list[Any], numels: list[int], devices: list[torch.device]) -> list[list[int]]:
    """Indices grouped by equal key into stacks (small accelerator tensors only, others alone)."""
    buckets: dict[Any, list[list[int]]] = {}
    out: list[list[int]] = []
    for i, (key, numel, device) in enumerate(zip(keys, numels, devices)):
        if numel > _STACK_MAX_NUMEL or (device.type == "cpu" and not _STACK_ON_CPU):
            out.append([i])
            continue
        stacks = buckets.setdefault(key, [[]])
        if (len(stacks[-1]) + 1) * numel > _STACK_MAX_TOTAL:
            stacks.append([])
        stacks[-1].append(i)
    return out + [idx for stacks in buckets.values() for idx in stacks]


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def factored_second_moment_(
    grads: list[Tensor], rows: list[Tensor], cols: list[Tensor], *, beta2: float, eps_factored: float
) -> None:
    """r ← β2·r + (1−β2)·(mean_j g_ij² + ε1);  c ← β2·c + (1−β2)·(mean_i g_ij² + ε1)  (in place).

    ``g`` is (..., m, n), ``r`` is (..., m), ``c`` is (..., n). On accelerators the sums of squares
    come from two norm reductions per stack of same-shaped gradients (``g⊙g`` is never
    materialized); on CPU from one ``g⊙g`` summed along both axes, which is faster there.
    """
    if not grads:
        return
    sums: list[Optional[Tensor]] = [None] * (2 * len(grads))
    squared = [False] * (2 * len(grads))  # True: sums[i] is Σg², False: sums[i] is ‖g‖ (square it)
    keys = [(g.shape, g.device, g.dtype) for g in grads]
    for idx in _stack_buckets(keys, [g.numel() for g in grads], [g.device for g in grads]):
        stacked = _stack([grads[i] for i in idx])
        if stacked.device.type == "cpu":
            # On CPU a norm over the row axis (dim −2) is ~6x slower than materializing g⊙g once
            # and summing it along both axes (measured on 768×256 … 8192×256 float32).
            g2 = stacked.square()
            row_sums, col_sums = g2.sum(-1).unbind(0), g2.sum(-2).unbind(0)
            flag = True
        else:
            row_sums = torch.linalg.vector_norm(stacked, dim=-1).unbind(0)
            col_sums = torch.linalg.vector_norm(stacked, dim=-2).unbind(0)
            flag = False
        for i, row, col in zip(idx, row_sums, col_sums):
            sums[i], sums[len(grads) + i] = row, col
            squared[i] = squared[len(grads) + i] = flag
    # β2·r + (1−β2)/n·Σ_j g_ij² + (1−β2)·ε1, and likewise for c
    factors = rows + cols
    inv_counts = [1.0 / g.shape[-1] for g in grads] + [1.0 / g.shape[-2] for g in grads]
    torch._foreach_mul_(factors, beta2)
    from_norms = [i for i, sq in enumerate(squared) if not sq]
    from_sums = [i for i, sq in enumerate(squared) if sq]
    if from_norms:
        torch._foreach_addcmul_([factors[i] for i in from_norms], [sums[i] for i in from_norms],
                                [sums[i] for i in from_norms], [(1.0 - beta2) * inv_counts[i] for i in from_norms])
    if from_sums:
        scaled = torch._foreach_mul([sums[i] for i in from_sums], [(1.0 - beta2) * inv_counts[i] for i in from_sums])
        torch._foreach_add_([factors[i] for i in from_sums], scaled)
    torch._foreach_add_(factors, (1.0 - beta2) * eps_factored)


def factored_denominators(
    rows: list[Tensor], cols: list[Tensor], bias_corrections2: list[float], *, eps: float
) -> list[Tensor]:
    """sqrt(V̂) + ε2 with V̂ = r cᵀ / (mean(r)·(1−β2^t)), one (..., m, n) tensor per matrix.

    Built per stack of same-shaped matrices as ε2 + a bᵀ·sqrt(m / (1−β2^t)) with
    a = sqrt(r) / ‖sqrt(r)‖ (so that a_i² = r_i / (m·mean(r))) and b = sqrt(c), in one kernel.
    """
    if not rows:
        return []
    out: list[Optional[Tensor]] = [None] * len(rows)
    roots = torch._foreach_sqrt(rows + cols)
    row_roots, col_roots = roots[: len(rows)], roots[len(rows) :]
    keys = [(r.shape, c.shape, r.device, r.dtype, bc2) for r, c, bc2 in zip(rows, cols, bias_corrections2)]
    numels = [r.numel() * c.shape[-1] for r, c in zip(rows, cols)]
    eps_tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for idx in _stack_buckets(keys, numels, [r.device for r in rows]):
        a = _stack([row_roots[i] for i in idx])
        b = _stack([col_roots[i] for i in idx])
        a = torch.div(a, torch.linalg.vector_norm(a, dim=-1, keepdim=True))
        if (a.device, a.dtype) not in eps_tensors:
            eps_tensors[a.device, a.dtype] = torch.full((), eps, dtype=a.dtype, device=a.device)
        denom = torch.addcmul(
            eps_tensors[a.device, a.dtype],
            a.unsqueeze(-1),
            b.unsqueeze(-2),
            value=math.sqrt(a.shape[-1] / bias_corrections2[idx[0]]),
        )
        for i, d in zip(idx, denom.unbind(0)):
            out[i] = d
    return out  # type: ignore[return-value]


def relative_step_size(params: list[Tensor], steps: list[int], lr: float) -> list[Tensor]:
    """Adafactor's relative step size η_t = min(lr, 1/sqrt(t))·max(1e-3, RMS(W)), one 0-d tensor each.

    Shazeer & Stern 2018, Sec. 8 and Alg. 4-5: α_t = max(ε2, RMS(X_{t−1}))·ρ_t with ε2 = 1e-3 and
    the proposed ρ_t = min(1e-2, 1/sqrt(t)); here the cap 1e-2 is ``lr``, so ``lr=1e-2`` gives the
    paper's rule. RMS(W) is taken before the step's weight decay.
    """
    norms = torch._foreach_norm(params)
    torch._foreach_mul_(norms, [1.0 / math.sqrt(p.numel()) for p in params])
    torch._foreach_clamp_min_(norms, _PARAM_SCALE_FLOOR)
    torch._foreach_mul_(norms, [min(lr, 1.0 / math.sqrt(t)) for t in steps])
    return list(norms)


def adafactor_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    denoms: list[Tensor],
    bias_corrections1: list[float],
    *,
    lr: float | list[Tensor],
    weight_decay: float,
    clip_threshold: Optional[float],
) -> None:
    """W ← W − ηλW − η·U·min(1, d / RMS(U)) with U = M̂ / (sqrt(V̂) + ε2)  (in place).

    ``denoms`` holds sqrt(V̂) + ε2 and is consumed. ``lr`` is a float, or one 0-d tensor per
    parameter (the relative step size). Clipping (``clip_threshold`` d) is skipped when ``None``.
    """
    if isinstance(lr, float) and clip_threshold is None:  # the common case: two foreach calls
        if weight_decay != 0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / bc1 for bc1 in bias_corrections1])
        return
    torch._foreach_mul_(denoms, bias_corrections1)
    updates = torch._foreach_div(exp_avgs, denoms)  # U = M̂ / (sqrt(V̂) + ε2)
    del denoms
    scales: Optional[list[Tensor]] = None if isinstance(lr, float) else list(lr)
    if clip_threshold is not None:
        rms = torch._foreach_norm(updates)
        torch._foreach_mul_(rms, [1.0 / (math.sqrt(u.numel()) * clip_threshold) for u in updates])
        torch._foreach_clamp_min_(rms, 1.0)
        torch._foreach_reciprocal_(rms)  # 1 / max(1, RMS(U)/d)
        scales = rms if scales is None else torch._foreach_mul(scales, rms)
    if weight_decay != 0:
        if isinstance(lr, float):
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            decay = torch._foreach_mul(lr, -weight_decay)
            torch._foreach_add_(decay, 1.0)
            torch._foreach_mul_(params, decay)
    if scales is not None:
        torch._foreach_mul_(updates, scales)
    torch._foreach_add_(params, updates, alpha=-lr if isinstance(lr, float) else -1.0)


@dataclass(kw_only=True)
class AdafactorHParams(HParams):
    #: learning rate η (≥ 0); with relative_step, the cap of the relative step size
    lr: float = 1e-3
    #: (β1, β2), each in [0, 1)
    betas: tuple[float, float] = (0.9, 0.95)
    #: ε2, added to sqrt(V̂) (> 0)
    eps: float = 1e-8
    #: ε1, added to g⊙g inside the factorization (> 0)
    eps_factored: float = 1e-30
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0
    #: update clipping threshold d (> 0), None: off
    clip_threshold: Optional[float] = None
    #: Adafactor's relative step size
    relative_step: bool = False

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_eps(self.eps_factored, name="eps_factored")
        check_weight_decay(self.weight_decay)
        if self.clip_threshold is not None:
            check_range("clip_threshold", self.clip_threshold, 0.0, math.inf, lo_open=True)
        check_bool("relative_step", self.relative_step)


class Adafactor(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """Adam with Adafactor's factored second moment for matrices and a full first moment.

    r ← β2·r + (1−β2)·mean_j(g⊙g + ε1);  c ← β2·c + (1−β2)·mean_i(g⊙g + ε1);  V̂ = r cᵀ / mean(r);
    M ← β1·M + (1−β1)·g;  W ← W − ηλW − η·M̂ / (sqrt(V̂) + ε2)   (hats: Adam's bias corrections).
    Tensors of < 2 dims use Adam's v ← β2·v + (1−β2)·g⊙g instead of r cᵀ / mean(r).

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts.
        lr: η, default 1e-3 (with ``relative_step``, the cap of the relative step size).
        betas: (β1, β2), default (0.9, 0.95).
        eps: ε2, added to sqrt(V̂), default 1e-8.
        eps_factored: ε1, added to g⊙g inside the factorization, default 1e-30.
        weight_decay: λ, decoupled, with the pre-update W, default 0.0.
        clip_threshold: d; when set, U = M̂ / (sqrt(V̂) + ε2) is divided by max(1, RMS(U)/d) per
            tensor. Default None (off). Adafactor (Sec. 6) clips g/sqrt(V̂) before its momentum;
            with an Adam-style momentum on g the clip applies to the final update instead.
        relative_step: if True, η_t = min(lr, 1/sqrt(t))·max(1e-3, RMS(W)) per tensor (Adafactor's
            relative step size, Sec. 8 of the paper, with its cap 1e-2 replaced by ``lr``), also
            used for the weight decay. Default False.

    Example:
        >>> opt = Adafactor(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    State: ``exp_avg`` (M, 4 bytes/param in float32), ``exp_avg_sq_row`` (r) and
    ``exp_avg_sq_col`` (c) for ≥ 2-D tensors, ``exp_avg_sq`` (v) for < 2-D tensors, ``step``.

    Paper: Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost";
    the momentum variant as in Zhao et al. 2025, "Deconstructing What Makes a Good Optimizer".
    """

    hparams_class = AdafactorHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("eps",), whole_tensors=True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        eps_factored: float = 1e-30,
        weight_decay: float = 0.0,
        clip_threshold: Optional[float] = None,
        relative_step: bool = False,
        nonfinite: str = "ignore",
    ) -> None:
        AdafactorHParams(lr=lr, betas=betas, eps=eps, eps_factored=eps_factored, weight_decay=weight_decay,
                         clip_threshold=clip_threshold, relative_step=relative_step, nonfinite=nonfinite)
        defaults = dict(
            nonfinite=nonfinite,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            eps_factored=eps_factored,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            relative_step=relative_step,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1])
            state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @classmethod
    def mup_family_for(cls, hparams: Mapping[str, Any]) -> str:
        if hparams.get("relative_step", False):
            raise ValueError(
                "adafactor with relative_step=True has no μP rule: its step is scaled by RMS(W), which μP's "
                "fan-in init makes width-dependent; use relative_step=False (the Adam rule then applies)"
            )
        return super().mup_family_for(hparams)

    def _update(self) -> None:
        for group in self.param_groups:
            self._step_group(group)

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        """lr / (sqrt(V̂) + ε2) per coordinate (fixed learning rate only: None with relative_step)."""
        if group["relative_step"] or not state or state["step"] == 0:
            return None
        return float(group["lr"]) / (self._sqrt_v_hat(p, group, state) + group["eps"])

    def _gather(self, group: dict[str, Any]) -> tuple[list[list], list[list]]:
        """Per-parameter lists (param, grad, M, step, r, c) for ≥ 2-D and (…, v) for < 2-D tensors."""
        fac: list[list] = [[], [], [], [], [], []]
        full: list[list] = [[], [], [], [], []]
        for p in group["params"]:
            grad = p.grad
            if grad is None or p.numel() == 0:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            state["step"] += 1
            if p.dim() >= 2:
                lists, extra = fac, (state["exp_avg_sq_row"], state["exp_avg_sq_col"])
            else:
                lists, extra = full, (state["exp_avg_sq"],)
            for out, value in zip(lists, (p, grad, state["exp_avg"], state["step"], *extra)):
                out.append(value)
        return fac, full

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        (fac_p, fac_g, fac_m, fac_t, rows, cols), (full_p, full_g, full_m, full_t, full_v) = self._gather(group)
        # Factored tensors first, then the others: every list below lines up with `params`.
        params, grads, exp_avgs, steps = fac_p + full_p, fac_g + full_g, fac_m + full_m, fac_t + full_t
        if not params:
            return
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        factored_second_moment_(fac_g, rows, cols, beta2=beta2, eps_factored=group["eps_factored"])
        denoms = factored_denominators(rows, cols, [1.0 - beta2**t for t in fac_t], eps=group["eps"])
        if full_p:  # Adam's second moment
            torch._foreach_mul_(full_v, beta2)
            torch._foreach_addcmul_(full_v, full_g, full_g, 1.0 - beta2)
            dense = torch._foreach_sqrt(full_v)
            torch._foreach_div_(dense, [math.sqrt(1.0 - beta2**t) for t in full_t])
            torch._foreach_add_(dense, group["eps"])
            denoms += dense
        lr: float | list[Tensor] = float(group["lr"])
        if group["relative_step"]:
            lr = relative_step_size(params, steps, lr)
        adafactor_update_(
            params,
            exp_avgs,
            denoms,
            [1.0 - beta1**t for t in steps],
            lr=lr,
            weight_decay=group["weight_decay"],
            clip_threshold=group["clip_threshold"],
        )

    def _sqrt_v_hat(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
        bc2 = 1.0 - float(group["betas"][1]) ** state["step"]
        if "exp_avg_sq" in state:
            return (state["exp_avg_sq"].float() / bc2).sqrt()
        r = state["exp_avg_sq_row"].float()
        c = state["exp_avg_sq_col"].float()
        v_hat = r.unsqueeze(-1) * c.unsqueeze(-2) / (r.mean(dim=-1, keepdim=True).unsqueeze(-1) * bc2)
        return v_hat.sqrt()

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        # Statistics of the next step's Adam-like update, weight decay excluded. With
        # relative_step the learning rate is the relative step size at the current W; with
        # clipping, `clip_scale` is the factor 1/max(1, RMS(U)/d) the last state would get.
        t = state["step"]
        lr = float(group["lr"])
        if group["relative_step"]:
            lr = relative_step_size([p.detach()], [t], lr)[0].item()
        m_hat = state["exp_avg"].float() / (1.0 - float(group["betas"][0]) ** t)
        sqrt_v_hat = self._sqrt_v_hat(p, group, state)
        out = diagonal_stats(p, lr, sqrt_v_hat, float(group["eps"]), m_hat)
        if group["clip_threshold"] is not None:
            u_rms = (m_hat / (sqrt_v_hat + group["eps"])).pow(2).mean().sqrt().item()
            out["clip_scale"] = 1.0 / max(1.0, u_rms / float(group["clip_threshold"]))
        return out
