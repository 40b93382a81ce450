"""SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's Kronecker factors.

The default mode follows the authors' reference implementation point by point (see
``docs/optimizers.md``, section ``soap``): the first step only initializes the factors and bases; the first moment lives
in the rotated basis and follows it across refreshes, the second moment is only re-ordered;
bases are refreshed every ``precondition_frequency`` steps by one power-iteration step with QR;
decoupled weight decay comes after the update, on the updated weights.

Faster than the reference with the same numbers (up to float32 rounding): the first moment is
rotated back and forth only when a basis changed (the reference does it every step), the
updated weights are written with foreach ops, same-shaped matrices on an accelerator are rotated
as one ``bmm`` stack, and no step reads the device except for one finiteness flag per step (and
the decompositions at a refresh). Options that change the numbers are off by default:
``refresh="cholesky_qr"`` and ``spread_refresh=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ._validate import check_betas, check_eps, check_lr, check_positive_int, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool, check_choice
from .health import HealthMixin, quantile_stats, update_stats
from .kronecker import (
    eigenbasis,
    factor_health,
    gram,
    mark_refreshed,
    new_factors,
    power_qr_refresh,
    power_qr_refresh_batched,
    project,
    project_matrices,
    side_names,
    timed,
    update_factor_states_,
    work_shape,
)

__all__ = ["SOAP", "soap_rotated_adam_"]

REFRESH_METHODS = ("qr", "cholesky_qr")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Accelerators: same-shaped matrices are rotated as one bmm stack when a stack holds at most
# this many elements (bounds the temporary memory). On the CPU launches are cheap and the
# stacking copy is not, so none is made (the tests turn it on through ``_stack_on_cpu``).
_STACK_MAX_TOTAL = 1 << 27


def soap_rotated_adam_(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rotated_grads: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """M ← β1·M + (1−β1)·G';  V ← β2·V + (1−β2)·G'⊙G';  returns N' = M / (√V + ε)  (foreach).

    ``G' = Q_Lᵀ G Q_R`` is the gradient in the eigenbasis; M and V live there (in place). M is
    updated by one lerp (the reference's multiply-then-add, up to rounding, in one pass).
    """
    torch._foreach_lerp_(exp_avgs, rotated_grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, rotated_grads, rotated_grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    return torch._foreach_div(exp_avgs, denom)


@dataclass(kw_only=True)
class SOAPHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 3e-3
    #: (β1, β2) of the rotated Adam, each in [0, 1)
    betas: tuple[float, float] = (0.95, 0.95)
    #: β_s of the factor EMAs, < 1; negative means β2
    shampoo_beta: float = -1.0
    #: ε added to √V (> 0)
    eps: float = 1e-8
    #: decoupled weight decay λ, after the update (≥ 0)
    weight_decay: float = 0.01
    #: steps between basis refreshes (integer ≥ 1)
    precondition_frequency: int = 10
    #: larger dimensions get no factor (integer ≥ 1)
    max_precond_dim: int = 10000
    #: merge consecutive dims while their product is ≤ max_precond_dim
    merge_dims: bool = False
    #: give 1-D tensors a factor too
    precondition_1d: bool = False
    #: divide the rotated-back update by its RMS
    normalize_grads: bool = False
    #: Adam's bias correction in the step size
    correct_bias: bool = True
    #: "qr" (reference, Householder) or "cholesky_qr"
    refresh: str = "qr"
    #: refresh each tensor at its own phase of the period
    spread_refresh: bool = False
    #: non-finite gradients are skipped by default
    nonfinite: str = "skip"

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_range("shampoo_beta", self.shampoo_beta, -float("inf"), 1.0, hi_open=True)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        check_positive_int("precondition_frequency", self.precondition_frequency)
        check_positive_int("max_precond_dim", self.max_precond_dim)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias", "spread_refresh"):
            check_bool(name, getattr(self, name))
        check_choice("refresh", self.refresh, REFRESH_METHODS)


class SOAP(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """SOAP: W ← W − η·√(1−β2ᵗ)/(1−β1ᵗ)·Q_L (M / (√V + ε)) Q_Rᵀ, then W ← W − ηλW.

    Per matrix: factors L ← lerp(L, G Gᵀ, 1−β_s), R ← lerp(R, Gᵀ G, 1−β_s); bases Q_L, Q_R their
    eigenvectors (descending), refreshed every ``precondition_frequency`` steps by one power
    iteration with QR; G' = Q_Lᵀ G Q_R, M ← β1·M + (1−β1)·G', V ← β2·V + (1−β2)·G'² in the
    rotated basis. n-d tensors get one factor per dimension; dims > ``max_precond_dim`` none.

    Args:
        params: parameters, (name, parameter) pairs or param-group dicts.
        lr: η (default 3e-3).
        betas: (β1, β2) of the rotated Adam (default (0.95, 0.95)).
        shampoo_beta: β_s of the factor EMAs; negative means β2 (default -1).
        eps: ε added to √V (default 1e-8).
        weight_decay: decoupled λ, applied after the update (default 0.01).
        precondition_frequency: steps between basis refreshes (default 10).
        max_precond_dim: larger dimensions get no factor and stay unrotated (default 10000).
        merge_dims: merge consecutive dims while their product is ≤ max_precond_dim (default False).
        precondition_1d: give 1-D tensors a factor too (default False: plain Adam).
        normalize_grads: divide the rotated-back update by its RMS (default False).
        correct_bias: Adam's bias correction in the step size (default True).
        refresh: ``"qr"`` (reference, Householder) or ``"cholesky_qr"`` (CholeskyQR2, faster on
            accelerators, same basis up to signs where F·Q is well conditioned; changes the
            numbers beyond rounding where it is not). Default ``"qr"``.
        spread_refresh: refresh each tensor at its own phase of the period, balancing the
            refresh work over steps (changes the numbers; default False).
        nonfinite: a non-finite gradient leaves its parameter's state unchanged and is counted
            and reported (``"skip"``, default), raises
            :class:`~lightning_optlab.optim.base.NonFiniteGradientError` (a ``FloatingPointError``)
            naming the parameter (``"raise"``), or is not checked (``"ignore"``: no device read
            per step). A group option, like the others.

    Example::

        opt = SOAP(model.parameters(), lr=3e-3, weight_decay=0.01, precondition_frequency=10)

    Paper: Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson, Kakade, "SOAP: Improving and
    Stabilizing Shampoo using Adam" (2024), arXiv:2409.11321.
    """

    hparams_class = SOAPHParams
    traits = Traits(mup_family="soap", mup_eps_keys=("eps",), first_step_initializes=True, whole_tensors=True,
                    float32_state=True, nonfinite="skip", skips_in_state=True)
    _stack_on_cpu = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        refresh: str = "qr",
        spread_refresh: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, shampoo_beta=shampoo_beta,
            eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
            correct_bias=correct_bias, refresh=refresh, spread_refresh=spread_refresh, nonfinite=nonfinite,
        )
        SOAPHParams(**defaults)
        #: host seconds spent on eigendecompositions and refreshes in the last step (no device sync
        #: of its own; the decompositions read a finiteness flag, so on an accelerator this is close
        #: to the device time of that work)
        self.last_refresh_seconds = 0.0
        self._phase_load: dict[int, list[float]] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------- state
    @property
    def fallback_count(self) -> int:
        """Decompositions that failed in their first attempt (retried, jittered or basis kept)."""
        return sum(int(s.get("fallbacks", 0)) for s in self.state.values())

    @staticmethod
    def _work_shape(p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return work_shape(p.shape, group["max_precond_dim"], group["merge_dims"])

    def _phase(self, group: dict[str, Any], sizes: list[int]) -> int:
        """Refresh phase: 0, or with ``spread_refresh`` the least-loaded slot (greedy on Σd³)."""
        if not group["spread_refresh"] or not sizes:
            return 0
        load = self._phase_load.setdefault(id(group), [0.0] * group["precondition_frequency"])
        if len(load) != group["precondition_frequency"]:
            load[:] = [0.0] * group["precondition_frequency"]
        slot = min(range(len(load)), key=lambda i: (load[i], i))
        load[slot] += float(sum(d**3 for d in sizes))
        return slot

    def _init_state(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """The first step: factors from this gradient, bases from their eigendecomposition."""
        dtype, shape = self.state_dtype(p), self._work_shape(p, group)
        g = grad.to(dtype).reshape(shape)
        beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        factors = new_factors(p.shape, group["max_precond_dim"], group["precondition_1d"], group["merge_dims"],
                              dtype=dtype, device=p.device)
        fallbacks = 0
        bases: list[Optional[Tensor]] = []
        for i, f in enumerate(factors):
            if f is None:
                bases.append(None)
                continue
            f.lerp_(gram(g, i), 1.0 - beta)
            _, q, fell_back = eigenbasis(f)
            fallbacks += int(fell_back)
            bases.append(q.to(dtype))
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["factors"] = factors
        state["bases"] = bases
        state["last_refresh"] = 0
        state["fallbacks"] = state.get("fallbacks", 0) + fallbacks
        state.setdefault("nonfinite_skips", 0)
        state["refresh_phase"] = self._phase(group, [f.shape[0] for f in factors if f is not None])

    # ------------------------------------------------------------------------------------ step
    def _update(self) -> None:
        refresh_seconds = 0.0
        for group in self.param_groups:
            active = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    refresh_seconds += timed(lambda: self._init_state(p, p.grad, group, state))
                else:
                    active.append((p, p.grad, state))
            if active:
                refresh_seconds += self._update_group(group, active)
        self.last_refresh_seconds = refresh_seconds

    def _update_group(self, group: dict[str, Any], active: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> float:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        shapes = [self._work_shape(p, group) for p, _, _ in active]
        grads = [g.to(self.state_dtype(p)).reshape(s) for (p, g, _), s in zip(active, shapes)]
        bases = [st["bases"] for _, _, st in active]
        exp_avgs = [st["exp_avg"].view(s) for (_, _, st), s in zip(active, shapes)]
        exp_avg_sqs = [st["exp_avg_sq"].view(s) for (_, _, st), s in zip(active, shapes)]
        steps = []
        for _, _, st in active:
            st["step"] += 1
            steps.append(st["step"])

        rotated = self._rotate(grads, bases, transpose=True)
        direction = soap_rotated_adam_(exp_avgs, exp_avg_sqs, rotated, beta1=beta1, beta2=beta2, eps=eps)
        del rotated
        updates = self._rotate(direction, bases, transpose=False)
        del direction
        updates = [u.reshape(p.shape) for u, (p, _, _) in zip(updates, active)]
        if group["normalize_grads"]:
            for u in updates:
                u.div_(u.norm().mul(u.numel() ** -0.5).add_(1e-30))
        self._apply(group, [p for p, _, _ in active], updates, steps, beta1, beta2, lr, wd)
        del updates

        # The preconditioner update (after the parameter update): factors, then due refreshes.
        # A tensor at phase r refreshes at the steps ≡ r (mod f): the first is r, or f when r = 0.
        beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        freq = group["precondition_frequency"]
        states = [st for _, _, st in active]
        firsts = [st.get("refresh_phase", 0) % freq or freq for st in states]
        due = [(states[i], shapes[i]) for i in update_factor_states_(states, grads, beta, frequency=freq, first=firsts)]
        if not due:
            return 0.0
        return timed(lambda: self._refresh(due, group["refresh"]))

    def _apply(self, group, params, updates, steps, beta1, beta2, lr, wd) -> None:
        """W ← W − step_size·N, then W ← W − ηλW (on the updated W), in float32 for bf16/fp16."""
        work = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]
        by_step: dict[int, list[int]] = {}
        for i, t in enumerate(steps):
            by_step.setdefault(t, []).append(i)
        for t, idx in by_step.items():
            step_size = lr
            if group["correct_bias"]:
                step_size = step_size * ((1.0 - beta2**t) ** 0.5) / (1.0 - beta1**t)
            torch._foreach_add_([work[i] for i in idx], [updates[i] for i in idx], alpha=-step_size)
        if wd > 0:
            torch._foreach_add_(work, work, alpha=-lr * wd)
        low = [(p, w) for p, w in zip(params, work) if p is not w]
        if low:
            torch._foreach_copy_([p for p, _ in low], [w for _, w in low])

    def _refresh(self, due: list[tuple[dict[str, Any], tuple[int, ...]]], method: str) -> None:
        """Power-iteration + QR refresh of every basis of the due tensors.

        With ``refresh="cholesky_qr"`` on an accelerator, same-sized factors are refreshed as one
        stack (:func:`power_qr_refresh_batched`); otherwise one :func:`power_qr_refresh` each.
        """
        results: dict[tuple[int, int], tuple[Optional[Tensor], Tensor]] = {}
        if method == "cholesky_qr":
            buckets: dict[Any, list[tuple[int, int]]] = {}
            for k, (st, _) in enumerate(due):
                for i, f in enumerate(st["factors"]):
                    if f is not None and (f.device.type != "cpu" or self._stack_on_cpu):
                        buckets.setdefault((f.shape[0], f.device, f.dtype), []).append((k, i))
            for keys in buckets.values():
                if len(keys) < 2:
                    continue
                fs = torch.stack([due[k][0]["factors"][i] for k, i in keys])
                qs = torch.stack([due[k][0]["bases"][i] for k, i in keys])
                q_new, order, ok = power_qr_refresh_batched(fs, qs, method)
                for j, key in enumerate(keys):
                    results[key] = (q_new[j] if ok[j] else None, order[j])
        for k, (st, shape) in enumerate(due):
            for i, (f, q) in enumerate(zip(st["factors"], st["bases"])):
                if f is not None and (k, i) not in results:
                    results[(k, i)] = power_qr_refresh(f, q, method=method)
            self._apply_refresh(st, shape, [results.get((k, i)) for i in range(len(st["factors"]))])

    @staticmethod
    def _apply_refresh(state: dict[str, Any], shape: tuple[int, ...], results: list) -> None:
        """New bases in; V re-ordered along each refreshed axis; M carried into the new basis."""
        old = list(state["bases"])
        exp_avg = state["exp_avg"].view(shape)
        exp_avg_sq = state["exp_avg_sq"].view(shape)
        new: list[Optional[Tensor]] = list(old)
        failed = 0
        for i, res in enumerate(results):
            if res is None:
                continue
            q_new, order = res
            if q_new is None:  # the QR failed even in float64: keep the previous basis, unpermuted
                failed += 1
                continue
            exp_avg_sq = exp_avg_sq.index_select(i, order)
            new[i] = q_new.to(old[i].dtype)
        mark_refreshed(state, failed)
        if all(a is b for a, b in zip(new, old)):
            return
        moved = exp_avg
        for i, (q_old, q_new) in enumerate(zip(old, new)):
            if q_new is not q_old:
                moved = _carry(moved, q_old, q_new, i)
        state["exp_avg"].view(shape).copy_(moved)
        state["exp_avg_sq"].view(shape).copy_(exp_avg_sq)
        for q_old, q_new in zip(old, new):
            if q_new is not None and q_new is not q_old:
                q_old.copy_(q_new)  # in place: stacked views of the bases stay valid

    def _rotate(self, xs: list[Tensor], bases: list[list[Optional[Tensor]]], transpose: bool) -> list[Tensor]:
        """:func:`project` over a list; same-shaped matrices on an accelerator go as one bmm stack."""
        out: list[Optional[Tensor]] = [None] * len(xs)
        buckets: dict[Any, list[int]] = {}
        for i, (x, b) in enumerate(zip(xs, bases)):
            stackable = x.dim() == 2 and (x.device.type != "cpu" or self._stack_on_cpu)
            if stackable and any(q is not None for q in b):
                key = (tuple(x.shape), tuple(q is None for q in b), x.device, x.dtype)
                bucket = buckets.setdefault(key, [])
                if (len(bucket) + 1) * x.numel() <= _STACK_MAX_TOTAL:
                    bucket.append(i)
                    continue
            out[i] = project(x, b, transpose)
        for key, idx in buckets.items():
            if len(idx) == 1:
                out[idx[0]] = project(xs[idx[0]], bases[idx[0]], transpose)
                continue
            left = self._stacked([bases[i][0] for i in idx], bases, idx, 0)
            right = self._stacked([bases[i][1] for i in idx], bases, idx, 1)
            y = project_matrices(torch.stack([xs[i] for i in idx]), left, right, transpose)
            for j, i in enumerate(idx):
                out[i] = y[j]
        return out  # type: ignore[return-value]

    def _stacked(
        self, qs: list[Optional[Tensor]], bases: list[list[Optional[Tensor]]], idx: list[int], side: int
    ) -> Optional[Tensor]:
        """The bases ``qs`` as one (B, d, d) tensor; the state's bases become views of it, so the
        stack is built once and kept up to date by the in-place refreshes."""
        if qs[0] is None:
            return None
        first = qs[0]
        buf = first._base
        if (
            buf is not None
            and buf.dim() == 3
            and buf.shape[0] == len(qs)
            and all(q._base is buf and q.data_ptr() == buf[j].data_ptr() for j, q in enumerate(qs))
        ):
            return buf
        buf = torch.stack(qs)  # type: ignore[arg-type]
        for j, i in enumerate(idx):
            bases[i][side] = buf[j]
        return buf

    # -------------------------------------------------------------------------------- health
    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        """Per factor (``L``/``R`` for matrices, ``F0``, ``F1``, ... otherwise) the keys Shampoo
        reports too (:func:`.kronecker.factor_health`): ``cond_X``, ``min_eig_over_eps_X`` and
        ``staleness_X`` = ‖offdiag(Qᵀ F Q)‖_F / ‖F‖_F of the basis in use; ``steps_since_refresh``,
        ``fallbacks``, ``nonfinite_skips``; and Adam's statistics in the rotated basis: ``eff_lr_*``
        = η·√(1−β2ᵗ)/(1−β1ᵗ)/(√V + ε), ``eps_frac``, ``update_rms``, ``update_to_weight``."""
        out: dict[str, float] = {
            "fallbacks": float(state.get("fallbacks", 0)),
            "nonfinite_skips": float(state.get("nonfinite_skips", 0)),
        }
        if "step" not in state:
            return out
        t, shape, eps = state["step"], self._work_shape(p, group), group["eps"]
        if any(f is not None for f in state["factors"]):
            out["steps_since_refresh"] = float(t - state["last_refresh"])
        for side, f, q in zip(side_names(len(shape)), state["factors"], state["bases"]):
            if f is not None:
                out.update(factor_health(side, f, q, eps))
        if t < 1:
            return out
        beta1, beta2 = group["betas"]
        scale = group["lr"]
        if group["correct_bias"]:
            scale = scale * ((1.0 - beta2**t) ** 0.5) / (1.0 - beta1**t)
        sqrt_v = state["exp_avg_sq"].float().sqrt()
        out.update(quantile_stats("eff_lr", scale / (sqrt_v + eps)))
        out["eps_frac"] = (sqrt_v < eps).float().mean().item()
        direction = (state["exp_avg"].float() / (sqrt_v + eps)).view(shape)
        bases = [None if q is None else q.float() for q in state["bases"]]
        n = project(direction, bases, transpose=False).reshape(p.shape)
        if group["normalize_grads"]:
            n = n / (n.pow(2).mean().sqrt() + 1e-30)
        out.update(update_stats(p, scale * n))
        return out


def _mul_along(x: Tensor, a: Tensor, dim: int) -> Tensor:
    """Multiply dimension ``dim`` of ``x`` by the matrix ``a`` (``a @ x`` for dim 0 of a matrix)."""
    if x.dim() == 2:
        return a @ x if dim == 0 else x @ a.T
    if x.dim() == 1:
        return a @ x
    return torch.movedim(torch.tensordot(a, x, dims=([1], [dim])), 0, dim)


def _carry(m: Tensor, q_old: Tensor, q_new: Tensor, dim: int) -> Tensor:
    """M (in the old basis along ``dim``) into the new one: Q_newᵀ (Q_old M).

    Done as (Q_newᵀ Q_old) M when that is cheaper (d² < numel: 2d³ + 2d·numel flops instead of
    4d·numel), e.g. the small side of a tall matrix; equal up to rounding.
    """
    d = q_old.shape[0]
    if d * d < m.numel():
        return _mul_along(m, q_new.T @ q_old, dim)
    return _mul_along(_mul_along(m, q_old, dim), q_new.T, dim)
