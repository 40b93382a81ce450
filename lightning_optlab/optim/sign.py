"""Sign-descent optimizers: Lion and Signum, one sign-update kernel with two presets.

Both take a step of fixed size η per coordinate in the direction of the sign of a momentum:
Lion interpolates the momentum and the gradient with β1 for the sign and tracks the momentum
with β2; Signum is the same kernel with β1 = β2 = β (and signSGD is β = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ._validate import check_beta, check_betas, check_lr, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits
from .health import HealthMixin, quantile_stats, update_stats

__all__ = ["Lion", "Signum", "LionHParams", "SignumHParams", "sign_update"]

# |m| is clamped below by this before the per-coordinate effective learning rate lr / |m| is
# reported, so coordinates with a zero momentum give a large finite value, not inf.
_HEALTH_MIN_ABS_MOMENTUM = 1e-12


def sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: Optional[list[Tensor]],
    *,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
) -> None:
    """W ← W − η·(sign(β1·m + (1−β1)·g) + λ·W);  m ← β2·m + (1−β2)·g  (in place, foreach).

    The weight decay uses the pre-update W. With ``beta1 == beta2`` the interpolation is the new
    momentum itself (Signum), which is then computed once, in place. ``exp_avgs=None`` means no
    momentum at all: W ← W − η·(sign(g) + λ·W) (signSGD).

    Args:
        params, grads, exp_avgs: lists of tensors of equal shapes (``exp_avgs`` may be ``None``).
        lr: η.  weight_decay: λ.  beta1: the sign's interpolation.  beta2: the momentum's decay.
    """
    if exp_avgs is None:
        direction = torch._foreach_sign(grads)
    elif beta1 == beta2:
        torch._foreach_mul_(exp_avgs, beta2)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
        direction = torch._foreach_sign(exp_avgs)
    else:
        direction = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(direction, grads, alpha=1.0 - beta1)
        torch._foreach_sign_(direction)
        torch._foreach_mul_(exp_avgs, beta2)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, direction, alpha=-lr)


@dataclass(kw_only=True)
class LionHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-4
    #: (β1, β2): the sign's interpolation and the momentum's decay, each in [0, 1)
    betas: tuple[float, float] = (0.9, 0.99)
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_weight_decay(self.weight_decay)


@dataclass(kw_only=True)
class SignumHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-3
    #: momentum β in [0, 1); 0 is signSGD
    momentum: float = 0.9
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0

    def check(self) -> None:
        check_lr(self.lr)
        check_beta("momentum", self.momentum)
        check_weight_decay(self.weight_decay)


class _SignOptimizer(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """State handling and health shared by Lion and Signum; subclasses say which betas to use."""

    traits = Traits(mup_family="sign")

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        raise NotImplementedError

    def _update(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = self._betas(group)
            use_momentum = not (beta1 == 0.0 and beta2 == 0.0)
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if use_momentum and "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                if use_momentum:
                    exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            sign_update(
                params,
                grads,
                exp_avgs if use_momentum else None,
                lr=float(group["lr"]),
                weight_decay=float(group["weight_decay"]),
                beta1=beta1,
                beta2=beta2,
            )

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        # For a sign method every coordinate moves by exactly lr; its effective learning rate,
        # the step per unit of momentum, is lr / |m| (|m| clamped at 1e-12). The update
        # statistics are those of the next step's direction lr·sign(m) (weight decay excluded).
        m = state.get("exp_avg")
        if m is None:  # signSGD: the direction is the gradient's sign
            m = p.grad if p.grad is not None else torch.zeros_like(p)
        lr = float(group["lr"])
        m = m.detach().float()
        out = quantile_stats("eff_lr", lr / m.abs().clamp_min(_HEALTH_MIN_ABS_MOMENTUM))
        out["eps_frac"] = 0.0
        out.update(update_stats(p, lr * torch.sign(m)))
        return out


class Lion(_SignOptimizer):
    """Lion: sign descent on an interpolation of momentum and gradient.

    c = β1·m + (1−β1)·g;  W ← W − η·(sign(c) + λ·W);  m ← β2·m + (1−β2)·g
    (weight decay with the pre-update W, as ``lion-pytorch``).

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts.
        lr: η, default 1e-4 (typically 3-10x smaller than AdamW's).
        betas: (β1, β2), default (0.9, 0.99).
        weight_decay: λ, default 0.0 (typically 3-10x larger than AdamW's).

    Example:
        >>> opt = Lion(model.parameters(), lr=3e-5, weight_decay=1.0)

    State: ``exp_avg`` (m) and ``step``; 4 bytes/param in float32.

    Paper: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        nonfinite: str = "ignore",
    ) -> None:
        LionHParams(lr=lr, betas=betas, weight_decay=weight_decay, nonfinite=nonfinite)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, nonfinite=nonfinite))

    hparams_class = LionHParams

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        return float(beta1), float(beta2)


class Signum(_SignOptimizer):
    """Signum: sign descent on the momentum (signSGD when momentum is 0).

    m ← β·m + (1−β)·g;  W ← W − η·λ·W − η·sign(m)  (weight decay with the pre-update W).

    Args:
        params: tensors, (name, tensor) pairs or param-group dicts.
        lr: η, default 1e-3.
        momentum: β, default 0.9; 0 gives signSGD, W ← W − η·sign(g), and keeps no buffer.
        weight_decay: λ, default 0.0.

    Example:
        >>> opt = Signum(model.parameters(), lr=1e-4, momentum=0.9)

    State: ``exp_avg`` (m, absent when momentum is 0) and ``step``; 4 bytes/param in float32.

    Paper: Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems".
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nonfinite: str = "ignore",
    ) -> None:
        SignumHParams(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite=nonfinite)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite=nonfinite))

    hparams_class = SignumHParams

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        beta = float(group["momentum"])
        return beta, beta
