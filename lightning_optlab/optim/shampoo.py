"""Shampoo (Gupta et al. 2018) with Distributed Shampoo's norm grafting, and Shampoo² (e = 1/2).

Per tensor dimension i of size ≤ ``max_precond_dim`` a Kronecker factor F_i (for a matrix: L and
R) accumulates the gradient's contractions (shared code: :mod:`.kronecker`); every
``precondition_frequency`` steps the inverse roots (F_i + εI)^(−e) are recomputed, by a
symmetric eigendecomposition or a coupled Newton iteration, and reused in between. The
preconditioned momentum is rescaled per parameter to the norm of a simple optimizer's update
(the graft: Adam, AdaGrad, RMSprop or SGD), which sets the learning-rate scale; before the first
root, and for 1-D parameters, the graft's own update is taken.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._validate import check_beta, check_eps, check_lr, check_positive_int, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool, check_choice, looks_flattened, param_name, sharding_problem
from .health import HealthMixin, quantile_stats, update_stats
from .kronecker import (
    factor_health,
    mark_refreshed,
    new_factors,
    project,
    safe_eigh,
    side_names,
    timed,
    update_factor_states_,
    work_shape,
)

__all__ = ["Shampoo", "ShampooHParams", "inverse_root_eigh", "inverse_root_newton", "graft_denominators_",
           "sharding_problem", "looks_flattened", "GRAFTINGS"]

#: grafting optimizers: the Shampoo direction takes the norm of this one's update
GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
_ROOTS = ("eigh", "newton")
# Floor of the Shampoo direction's norm in the graft ratio ‖graft‖/‖shampoo‖: a zero momentum
# gives a zero update instead of 0/0.
_TINY = 1e-30
# A Newton root is accepted when max|M − I| (M = X^p·A, → I at convergence) is below this;
# otherwise the eigendecomposition is used instead (and counted as a fallback).
_NEWTON_ACCEPT = 1e-3


def inverse_root_eigh(factor: Tensor, exponent: float, eps: float) -> tuple[Optional[Tensor], bool]:
    """(F + εI)^(−e) = Q·diag((max(λ, 0) + ε)^(−e))·Qᵀ from F = Q·diag(λ)·Qᵀ.

    Eigenvalues below 0 (rounding of a positive semi-definite F) are clamped to 0 before ε is
    added. The eigendecomposition is :func:`.kronecker.safe_eigh` (float64 and jitter retries).
    Returns ``(root, fell_back)``; ``root`` is None when no finite root could be computed
    (a non-finite factor, or an overflowing power): the caller keeps the previous one.
    """
    evals, evecs, fell_back = safe_eigh(factor)
    if fell_back and not bool(torch.isfinite(factor).all()):
        return None, True  # safe_eigh's last resort (identity basis) is no root of this factor
    root = (evecs * (evals.clamp_min(0) + eps).pow(-exponent)) @ evecs.T
    root = root.to(factor.dtype)
    if not bool(torch.isfinite(root).all()):
        return None, True
    return root, fell_back


def inverse_root_newton(factor: Tensor, p: int, eps: float, max_iters: int = 100) -> tuple[Tensor, float]:
    """(F + ε'I)^(−1/p) by the coupled Newton iteration (Guo & Higham 2006; Shampoo's original code).

    A = F + ε'I with ε' = max(ε, n·u·‖F‖_F) (u: the unit roundoff; a smaller shift is lost in
    rounding and would leave A numerically singular, where the iteration does not converge);
    z = (1 + p)/(2·‖A‖_F); X₀ = z^(1/p)·I, M₀ = z·A; then T = ((p + 1)·I − M)/p, X ← X·T,
    M ← T^p·M (so M = X^p·A throughout) until max|M − I| < 10·u or ``max_iters``. The iteration
    count grows with log(cond(A)) (about 20 in float32 at the floor above); each costs
    ⌊log2 p⌋ + popcount(p) + 1 matrix products (4 for p = 4). Returns the iterate with the smallest error
    and that error (about 1e-6 in float32).
    """
    n = factor.shape[0]
    eye = torch.eye(n, dtype=factor.dtype, device=factor.device)
    fnorm = float(torch.linalg.matrix_norm(factor))
    a = factor + max(eps, n * torch.finfo(factor.dtype).eps * fnorm) * eye
    z = (1.0 + p) / (2.0 * max(float(torch.linalg.matrix_norm(a)), _TINY))
    x = eye * z ** (1.0 / p)
    m = a * z
    tol = 10 * torch.finfo(factor.dtype).eps
    best_x, best_err = x, math.inf
    for _ in range(max_iters):
        t = (eye * (p + 1.0) - m) / p
        x = x @ t
        m = _matrix_power(t, p) @ m
        err = float((m - eye).abs().max())  # one host read per iteration (refresh steps only)
        if not math.isfinite(err):
            break
        if err < best_err:
            best_x, best_err = x, err
        if err < tol:
            break
    return best_x, best_err


def _matrix_power(t: Tensor, p: int) -> Tensor:
    """T^p by repeated squaring (p ≥ 1)."""
    out: Optional[Tensor] = None
    base = t
    while p:
        if p & 1:
            out = base if out is None else out @ base
        p >>= 1
        if p:
            base = base @ base
    assert out is not None
    return out


def _root(factor: Tensor, exponent: float, eps: float, method: str, newton_iters: int) -> tuple[Optional[Tensor], bool]:
    """A root by ``method``; a Newton root that does not converge or is not finite falls back to eigh."""
    if method == "newton":
        x, err = inverse_root_newton(factor, round(1.0 / exponent), eps, newton_iters)
        if err < _NEWTON_ACCEPT and bool(torch.isfinite(x).all()):
            return x, False
        root, _ = inverse_root_eigh(factor, exponent, eps)
        return root, True
    return inverse_root_eigh(factor, exponent, eps)


def graft_denominators_(
    kind: str, grads: list[Tensor], stats: list[Tensor], *, beta2: float, eps: float, steps: Sequence[int]
) -> Optional[list[Tensor]]:
    """Update the graft's second-moment state in place and return its denominators d (update m̂/d).

    adam:    v ← β2·v + (1−β2)·g²;  d = sqrt(v)/sqrt(1 − β2^t) + ε   (torch.optim.AdamW's order)
    adagrad: s ← s + g²;            d = sqrt(s) + ε                   (torch.optim.Adagrad's)
    rmsprop: v ← β2·v + (1−β2)·g²;  d = sqrt(v) + ε                   (torch.optim.RMSprop's)
    sgd, none: no state, None (the update is m̂ itself).
    """
    if kind in ("sgd", "none") or not grads:
        return None
    if kind == "adagrad":
        torch._foreach_addcmul_(stats, grads, grads, 1.0)
    else:
        torch._foreach_mul_(stats, beta2)
        torch._foreach_addcmul_(stats, grads, grads, 1.0 - beta2)
    denoms = torch._foreach_sqrt(stats)
    if kind == "adam":
        torch._foreach_div_(denoms, [(1.0 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    return denoms


def _state_dtype(p: Tensor) -> torch.dtype:
    # Factors, roots and the graft's moments of a bf16/fp16 parameter are kept in float32: an
    # EMA with β = 0.999 does not move in bf16, and eigendecompositions need the precision.
    return Shampoo.state_dtype(p)


@dataclass(kw_only=True)
class ShampooHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-3
    #: (β1 in [0, 1), β2 in (0, 1]): momentum and factor EMA (β2 = 1 sums)
    betas: tuple[float, float] = (0.9, 0.999)
    #: ε added to the factors' eigenvalues (> 0)
    eps: float = 1e-12
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0
    #: root exponent e per side in (0, 1], or "auto" (1/(2·order))
    exponent: Union[float, str] = 0.25
    #: steps between root refreshes (integer ≥ 1)
    precondition_frequency: int = 10
    #: first refresh (integer ≥ 1); None: precondition_frequency
    start_preconditioning_step: Optional[int] = None
    #: larger dimensions get no factor (integer ≥ 1)
    max_precond_dim: int = 4096
    #: merge consecutive dimensions while their product is ≤ max_precond_dim
    merge_dims: bool = False
    #: grafting optimizer: "adam", "adagrad", "rmsprop", "sgd" or "none"
    grafting: str = "adam"
    #: β2 of Adam/RMSprop grafting in [0, 1)
    graft_beta2: float = 0.999
    #: ε of the graft (> 0)
    graft_eps: float = 1e-8
    #: "eigh" or "newton" (coupled Newton iteration)
    root: str = "eigh"
    #: sum the factors as the original Shampoo
    factor_sum: bool = False
    #: Newton iteration cap (integer ≥ 1)
    newton_iters: int = 100
    #: non-finite gradients are skipped by default
    nonfinite: str = "skip"

    def check(self) -> None:
        check_lr(self.lr)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (β1 in [0, 1), β2 in (0, 1]), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_range("betas[1]", betas[1], 0.0, 1.0, lo_open=True)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        e = self.exponent
        if e != "auto":
            if isinstance(e, str):
                raise ValueError(f"exponent must be a number in (0, 1] or 'auto', got {e!r}")
            check_range("exponent", e, 0.0, 1.0, lo_open=True)
        check_positive_int("precondition_frequency", self.precondition_frequency)
        if self.start_preconditioning_step is not None:
            check_positive_int("start_preconditioning_step", self.start_preconditioning_step)
        check_positive_int("max_precond_dim", self.max_precond_dim)
        check_positive_int("newton_iters", self.newton_iters)
        check_bool("merge_dims", self.merge_dims)
        check_bool("factor_sum", self.factor_sum)
        check_choice("grafting", self.grafting, GRAFTINGS)
        check_choice("root", self.root, _ROOTS)
        check_beta("graft_beta2", self.graft_beta2)
        check_eps(self.graft_eps, "graft_eps")
        if self.root == "newton" and e != "auto" and abs(1.0 / float(e) - round(1.0 / float(e))) > 1e-9:
            raise ValueError(
                f"root='newton' computes inverse p-th roots for integer p, so exponent must be 1/p; got {e}. "
                "Use root='eigh' for other exponents."
            )


class Shampoo(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """Shampoo with norm grafting: W ← W − ηλW − η·(‖graft(m̂)‖/‖P‖)·P,  P = L^(−e) m̂ R^(−e).

    m ← β1·m + (1−β1)·g (m̂ = m/(1−β1^t));  L ← β2·L + (1−β2)·g gᵀ,  R ← β2·R + (1−β2)·gᵀg
    (sums L ← L + g gᵀ with ``factor_sum`` or β2 = 1); L^(−e) = (L + εI)^(−e), recomputed every
    ``precondition_frequency`` steps from ``start_preconditioning_step`` on. An n-d tensor has one
    factor per dimension. ``graft(m̂)`` is the grafting optimizer's update m̂/d
    (:func:`graft_denominators_`); it is the whole update before the first root, for 1-D tensors
    and for tensors with no side ≤ ``max_precond_dim``. With β1 = 0 and no preconditioning, Adam
    grafting is torch.optim.AdamW and AdaGrad grafting torch.optim.Adagrad, bit for bit.

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts.
        lr: η, default 1e-3 (the graft's learning rate: Adam-like values with Adam grafting).
        betas: (β1, β2) = (momentum, factor EMA), default (0.9, 0.999); β2 = 1 sums.
        eps: ε added to the factors' eigenvalues before the roots, default 1e-12.
        weight_decay: decoupled λ (with the pre-update W), default 0.0.
        exponent: e per side, default 0.25 (Gupta et al.); 0.5 is Shampoo² (Morwani et al.
            2024); "auto" is 1/(2·order), the original's rule for order-k tensors.
        precondition_frequency: steps between root refreshes, default 10.
        start_preconditioning_step: first refresh (and first preconditioned step), default
            ``precondition_frequency``; refreshes at t = start, start + f, ...
        max_precond_dim: larger dimensions get no factor (identity on that side), default 4096.
        merge_dims: merge consecutive dimensions while their product is ≤ max_precond_dim.
        grafting: "adam" (default), "adagrad", "rmsprop", "sgd" or "none".
        graft_beta2: β2 of Adam/RMSprop grafting, default 0.999.  graft_eps: its ε, default 1e-8.
        root: "eigh" (default) or "newton" (coupled Newton, e = 1/p with integer p; a root that
            does not converge falls back to eigh).
        factor_sum: sum the factors as the original Shampoo, default False.
        newton_iters: Newton iteration cap, default 100.
        nonfinite: "skip" (default: a NaN/inf gradient leaves the parameter and its state as
            they were, counted and reported), "raise" (NonFiniteGradientError, a ValueError, naming
            the parameter) or "ignore". One host sync per step unless "ignore".

    Example:
        >>> opt = Shampoo(model.parameters(), lr=3e-4, betas=(0.9, 0.95), exponent=0.5)

    State per parameter (float32 for bf16/fp16 parameters): ``exp_avg`` (if β1 > 0), the
    graft's ``graft_state`` (adam/adagrad/rmsprop), ``factors`` and ``roots`` (d_i² each per
    preconditioned side), ``step``, ``last_refresh``, ``fallbacks``, ``roots_kept``,
    ``nonfinite_skips``. ``last_refresh_seconds`` (on the optimizer) is the host time the last
    step spent computing roots (0.0 when it computed none).

    Papers: Gupta et al. 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization";
    Morwani et al. 2024, "A New Perspective on Shampoo's Preconditioner"; grafting as in
    Shi et al. 2023, "A Distributed Data-Parallel PyTorch Implementation of Shampoo".
    """

    hparams_class = ShampooHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("graft_eps",), whole_tensors=True, float32_state=True,
                    nonfinite="skip", skips_in_state=True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        exponent: Union[float, str] = 0.25,
        precondition_frequency: int = 10,
        start_preconditioning_step: Optional[int] = None,
        max_precond_dim: int = 4096,
        merge_dims: bool = False,
        grafting: str = "adam",
        graft_beta2: float = 0.999,
        graft_eps: float = 1e-8,
        root: str = "eigh",
        factor_sum: bool = False,
        newton_iters: int = 100,
        nonfinite: str = "skip",
    ) -> None:
        if start_preconditioning_step is None:
            start_preconditioning_step = precondition_frequency
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, exponent=exponent, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, grafting=grafting, graft_beta2=graft_beta2, graft_eps=graft_eps, root=root,
            factor_sum=factor_sum, newton_iters=newton_iters, nonfinite=nonfinite,
        )
        ShampooHParams(**defaults)
        super().__init__(params, defaults)
        self.last_refresh_seconds = 0.0

    @classmethod
    def mup_family_for(cls, hparams: Mapping[str, Any]) -> str:
        """The graft sets the update's size: Adam's rule for adam/adagrad/rmsprop grafting, SGD's for sgd."""
        grafting = hparams.get("grafting", "adam")
        family = {"adam": "adam", "adagrad": "adam", "rmsprop": "adam", "sgd": "sgd"}.get(grafting)
        if family is None:
            raise ValueError(
                f"shampoo with grafting={grafting!r} has no μP rule (its update size depends on the gradient scale); "
                "use grafting='adam' (the Adam rule then applies) or another optimizer"
            )
        return family

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if looks_flattened(p):
                warnings.warn(
                    f"Shampoo got a 1-D view of a larger buffer ({param_name(self, p)!r}), as FSDP1 with "
                    "use_orig_params=True hands out: it gets the graft's update only, no preconditioning. "
                    "Use DDP to precondition whole matrices.",
                    stacklevel=3,
                )

    # ------------------------------------------------------------------ step
    def _update(self) -> None:
        self.last_refresh_seconds = 0.0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" in state:
            return state
        dtype = _state_dtype(p)
        state.update(step=0, last_refresh=0, fallbacks=0, roots_kept=0)
        state.setdefault("nonfinite_skips", 0)  # counted by the base before a first step
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if group["grafting"] in ("adam", "adagrad", "rmsprop"):
            state["graft_state"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        factors = new_factors(p.shape, group["max_precond_dim"], False, group["merge_dims"], dtype=dtype, device=p.device)
        if p.dim() >= 2 and any(f is not None for f in factors):
            state["factors"] = factors
            # roots allocated up front and marked computed in root_set: the state keeps one structure
            # from the first step on (a distributed checkpoint loads into a fresh optimizer's state)
            state["roots"] = [torch.zeros_like(f) if f is not None else None for f in factors]
            state["root_set"] = [False] * len(factors)
        return state

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1 = group["betas"][0]
        lr, wd, kind = float(group["lr"]), float(group["weight_decay"]), group["grafting"]
        states = [self._init_state(group, p) for p in params]
        for s in states:
            s["step"] += 1
        steps = [s["step"] for s in states]
        grads = [p.grad if p.grad.dtype == _state_dtype(p) else p.grad.to(_state_dtype(p)) for p in params]
        if beta1 > 0:
            moms = [s["exp_avg"] for s in states]
            torch._foreach_lerp_(moms, grads, 1.0 - beta1)
        else:
            moms = grads
        denoms = graft_denominators_(
            kind, grads, [s.get("graft_state") for s in states],
            beta2=group["graft_beta2"], eps=group["graft_eps"], steps=steps,
        )
        # bias correction of m folded into the step size, as torch.optim.AdamW does
        step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
        self._update_factors(group, params, states, grads)
        pre = [i for i, s in enumerate(states) if _preconditioned(group, s)]
        directions = self._grafted_directions(group, params, states, moms, denoms, pre)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        plain = [i for i in range(len(params)) if i not in directions]
        if plain and denoms is not None:
            torch._foreach_addcdiv_(
                [params[i] for i in plain], [moms[i] for i in plain], [denoms[i] for i in plain],
                [step_sizes[i] for i in plain],
            )
        elif plain:
            for i in plain:
                params[i].add_(moms[i], alpha=step_sizes[i])
        for i, u in directions.items():
            params[i].add_(u, alpha=step_sizes[i])

    def _update_factors(self, group: dict[str, Any], params: list[Tensor], states: list[dict], grads: list[Tensor]) -> None:
        beta = None if group["factor_sum"] or group["betas"][1] == 1.0 else float(group["betas"][1])
        with_factors = [i for i, s in enumerate(states) if "factors" in s]
        due = update_factor_states_(
            [states[i] for i in with_factors], [grads[i].reshape(_merged(params[i], group)) for i in with_factors], beta,
            frequency=group["precondition_frequency"], first=group["start_preconditioning_step"],
        )
        refresh = [with_factors[j] for j in due]
        if not refresh:
            return

        def roots() -> None:
            for i in refresh:
                self._refresh_roots(group, params[i], states[i])

        self.last_refresh_seconds += timed(roots, sync=params[refresh[0]].device)

    def _refresh_roots(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        exponent = _exponent(group, len(state["factors"]))
        fallbacks = 0
        for j, f in enumerate(state["factors"]):
            if f is None:
                continue
            root, fell_back = _root(f, exponent, float(group["eps"]), group["root"], int(group["newton_iters"]))
            fallbacks += int(fell_back)
            if root is None:
                state["roots_kept"] += 1  # keep the previous root (or none: graft alone)
            else:
                state["roots"][j] = root
                if "root_set" in state:
                    state["root_set"][j] = True
        mark_refreshed(state, fallbacks)

    def _grafted_directions(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict], moms: list[Tensor],
        denoms: Optional[list[Tensor]], pre: list[int],
    ) -> dict[int, Tensor]:
        """{i: (‖graft‖/‖P‖)·P} for the preconditioned parameters (P alone without grafting)."""
        if not pre:
            return {}
        dirs = [
            project(moms[i].reshape(_merged(params[i], group)), live_roots(states[i]), transpose=False).reshape(params[i].shape)
            for i in pre
        ]
        if group["grafting"] == "none":
            return dict(zip(pre, dirs))
        grafts = [moms[i] / denoms[i] for i in pre] if denoms is not None else [moms[i] for i in pre]
        ratios = torch._foreach_div(torch._foreach_norm(grafts), torch._foreach_clamp_min(torch._foreach_norm(dirs), _TINY))
        torch._foreach_mul_(dirs, ratios)
        return dict(zip(pre, dirs))

    # ---------------------------------------------------------------- health
    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        return shampoo_health(p, group, state)

def _merged(p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
    """The factors' shape of ``p`` (:func:`.kronecker.work_shape`); only tensors with factors (≥ 2-D) ask."""
    return work_shape(p.shape, group["max_precond_dim"], group["merge_dims"])


def _exponent(group: dict[str, Any], order: int) -> float:
    e = group["exponent"]
    return 1.0 / (2 * order) if e == "auto" else float(e)


def live_roots(state: dict[str, Any]) -> list[Optional[Tensor]]:
    """The roots in use: computed ones, None for a side without one (yet). A state saved before
    ``root_set`` existed marks a missing root with None."""
    roots = state.get("roots") or []
    computed = state.get("root_set", [r is not None for r in roots])
    return [r if ok else None for r, ok in zip(roots, computed)]


def _preconditioned(group: dict[str, Any], state: dict[str, Any]) -> bool:
    return state["step"] >= group["start_preconditioning_step"] and any(r is not None for r in live_roots(state))


def _graft_denominator(group: dict[str, Any], state: dict[str, Any]) -> Optional[Tensor]:
    """The graft's denominator d from the state as it is (no update)."""
    kind, v = group["grafting"], state.get("graft_state")
    if v is None:
        return None
    d = v.sqrt()
    if kind == "adam":
        d = d / (1.0 - group["graft_beta2"] ** state["step"]) ** 0.5
    return d + group["graft_eps"]


def _root_directions_lr(roots: list[Optional[Tensor]], shape: tuple[int, ...]) -> Tensor:
    """Products Π_i r_i over the eigenvalues r_i of every root (1 where a side has none): the
    preconditioner's gain along each Kronecker eigen-direction (subsampled above 2^22)."""
    out = torch.ones((), dtype=torch.float64)
    per_side = max(2, int((1 << 22) ** (1.0 / max(len(shape), 1))))
    for r, d in zip(roots, shape):
        vals = torch.linalg.eigvalsh(r.double()).cpu() if r is not None else torch.ones(1, dtype=torch.float64)
        if vals.numel() > per_side:
            vals = vals[:: vals.numel() // per_side + 1]
        out = (out.unsqueeze(-1) * vals).reshape(-1)
    return out


def shampoo_health(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
    """Health statistics of one parameter, from its state (the next step without a new gradient).

    Per factor X (L, R for a matrix; F0, F1, ... otherwise): ``cond_X`` = (λ_max + ε)/(λ_min + ε)
    of the current factor; ``min_eig_over_eps_X`` = λ_min/ε; ``staleness_X`` = ‖offdiag(QᵀFQ)‖_F/‖F‖_F
    with Q the eigenbasis of the current root (0 right after a refresh). Per parameter:
    ``steps_since_refresh``, ``fallbacks``, ``roots_kept``, ``nonfinite_skips``;
    ``graft_norm_ratio`` = ‖graft(m̂)‖/‖P(m̂)‖ and ``eff_lr`` = η times it (preconditioned
    parameters); ``eff_lr_*`` quantiles: η·ratio·Π r_i over the roots' eigenvalues (the step per
    unit of m̂ along each Kronecker eigen-direction) or η/d per coordinate for the graft alone;
    ``update_rms``, ``update_to_weight`` of the next update (weight decay excluded).
    """
    t = state.get("step", 0)
    if t == 0:
        return {}
    lr, eps = float(group["lr"]), float(group["eps"])
    beta1 = group["betas"][0]
    m = state.get("exp_avg")
    if m is None:
        m = p.grad.to(_state_dtype(p)) if p.grad is not None else torch.zeros_like(p, dtype=_state_dtype(p))
    m_hat = (m / (1.0 - beta1**t)).double()
    denom = _graft_denominator(group, state)
    graft = m_hat / denom.double() if denom is not None else m_hat
    out: dict[str, float] = {"nonfinite_skips": float(state["nonfinite_skips"]), "steps": float(t)}
    factors = state.get("factors")
    if factors is not None:
        last = state["last_refresh"]
        out.update(steps_since_refresh=float(t - last), fallbacks=float(state["fallbacks"]),
                   roots_kept=float(state["roots_kept"]))
        for side, f, r in zip(side_names(len(factors)), factors, live_roots(state)):
            if f is not None:  # the basis in use: the eigenbasis of the current root
                out.update(factor_health(side, f, torch.linalg.eigh(r.double())[1] if r is not None else None, eps))
    if _preconditioned(group, state):
        shape = _merged(p, group)
        roots = [r.double() if r is not None else None for r in live_roots(state)]
        direction = project(m_hat.reshape(shape), roots, transpose=False).reshape(p.shape)
        ratio = 1.0
        if group["grafting"] != "none":
            ratio = float(torch.linalg.vector_norm(graft) / torch.linalg.vector_norm(direction).clamp_min(_TINY))
        out.update(graft_norm_ratio=ratio, eff_lr=lr * ratio)
        out.update(quantile_stats("eff_lr", lr * ratio * _root_directions_lr(live_roots(state), shape)))
        out.update(update_stats(p, lr * ratio * direction))
    else:
        out["eff_lr"] = lr
        per_coord = lr / denom.double() if denom is not None else torch.full((1,), lr, dtype=torch.float64)
        out.update(quantile_stats("eff_lr", per_coord))
        out.update(update_stats(p, lr * graft))
    return out
