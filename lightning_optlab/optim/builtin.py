"""torch's own SGD, AdamW and Adagrad, not rewritten: thin subclasses that validate their
hyperparameters with this package's messages, take the pack's ``nonfinite`` policy and add
``health()``.

The update rules are torch's (foreach / fused paths included); see ``torch.optim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ._validate import check_betas, check_eps, check_lr, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool
from .health import torch_optimizer_health

__all__ = ["SGD", "AdamW", "Adagrad", "SGDHParams", "AdamWHParams", "AdagradHParams"]


def _check_flags(h: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(h, name)
        if value is None and name in optional:
            continue
        check_bool(name, value)


@dataclass(kw_only=True)
class SGDHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-3
    #: heavy-ball momentum μ in [0, 1)
    momentum: float = 0.0
    #: dampening of the momentum in [0, 1]
    dampening: float = 0.0
    #: coupled L2 weight decay (≥ 0), as torch
    weight_decay: float = 0.0
    #: Nesterov momentum
    nesterov: bool = False
    #: maximize the objective
    maximize: bool = False
    #: torch's foreach path (None: torch decides)
    foreach: Optional[bool] = None
    #: torch's differentiable mode
    differentiable: bool = False
    #: torch's fused path (None: torch decides)
    fused: Optional[bool] = None

    def check(self) -> None:
        check_lr(self.lr)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("dampening", self.dampening, 0.0, 1.0)
        check_weight_decay(self.weight_decay)
        _check_flags(self, ("nesterov", "maximize", "foreach", "differentiable", "fused"), ("foreach", "fused"))


@dataclass(kw_only=True)
class AdamWHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-3
    #: (β1, β2), each in [0, 1)
    betas: tuple[float, float] = (0.9, 0.999)
    #: ε added to sqrt(v̂) (> 0)
    eps: float = 1e-8
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.01
    #: AMSGrad's running maximum of v
    amsgrad: bool = False
    #: maximize the objective
    maximize: bool = False
    #: torch's foreach path (None: torch decides)
    foreach: Optional[bool] = None
    #: capturable (CUDA graphs)
    capturable: bool = False
    #: torch's differentiable mode
    differentiable: bool = False
    #: torch's fused path (None: torch decides)
    fused: Optional[bool] = None

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        _check_flags(self, ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"), ("foreach", "fused"))


@dataclass(kw_only=True)
class AdagradHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-2
    #: learning-rate decay per step (≥ 0)
    lr_decay: float = 0.0
    #: coupled L2 weight decay (≥ 0), as torch
    weight_decay: float = 0.0
    #: initial value of the sum of squares (≥ 0)
    initial_accumulator_value: float = 0.0
    #: ε added to sqrt(s) (> 0)
    eps: float = 1e-10
    #: torch's foreach path (None: torch decides)
    foreach: Optional[bool] = None
    #: maximize the objective
    maximize: bool = False
    #: torch's differentiable mode
    differentiable: bool = False
    #: torch's fused path (None: torch decides)
    fused: Optional[bool] = None

    def check(self) -> None:
        check_lr(self.lr)
        check_range("lr_decay", self.lr_decay, 0.0, float("inf"))
        check_weight_decay(self.weight_decay)
        check_range("initial_accumulator_value", self.initial_accumulator_value, 0.0, float("inf"))
        check_eps(self.eps)
        _check_flags(self, ("foreach", "maximize", "differentiable", "fused"), ("foreach", "fused"))


class _TorchOptimizer(OptlabOptimizer):
    """The pack's prologue (non-finite policy) around torch's own step; health from torch's state."""

    def _update(self) -> None:
        super(OptlabOptimizer, self).step()  # the torch class after this mixin in the MRO

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)


class SGD(_TorchOptimizer, torch.optim.SGD):
    """``torch.optim.SGD``: ``b ← μ·b + g``; ``W ← W − η·(g + μ·b if nesterov else b)`` (+ L2 decay).

    Args: lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0 (coupled L2, as torch), nesterov=False,
    nonfinite="ignore". The studies' SGD uses heavy-ball momentum 0.98 (Zhao et al. 2025).
    State: momentum buffer (4 B/param).
    """

    hparams_class = SGDHParams
    traits = Traits(mup_family="sgd", sparse_ok=True)

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nonfinite: str = "ignore", **kwargs: Any) -> None:
        SGDHParams(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite=nonfinite, **kwargs)
        self._nonfinite_default = nonfinite
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
        self.defaults["nonfinite"] = nonfinite

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        return torch.full_like(p, float(group["lr"]), dtype=torch.float32)


class AdamW(_TorchOptimizer, torch.optim.AdamW):
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

    Args: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, nonfinite="ignore".
    State: m, v (8 B/param).
    """

    hparams_class = AdamWHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("eps",), sparse_ok=True)

    def __init__(
        self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.01, nonfinite: str = "ignore", **kwargs: Any,
    ) -> None:
        AdamWHParams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nonfinite=nonfinite, **kwargs)
        self._nonfinite_default = nonfinite
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.defaults["nonfinite"] = nonfinite

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        t = _step_of(state)
        if "exp_avg_sq" not in state or t == 0:
            return None
        return float(group["lr"]) / ((state["exp_avg_sq"].float() / (1 - group["betas"][1] ** t)).sqrt() + group["eps"])


class Adagrad(_TorchOptimizer, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (Duchi et al. 2011): ``s ← s + g²``; ``W ← W − η·g/(sqrt(s) + ε)``.

    Args: lr=1e-2, lr_decay=0, weight_decay=0 (coupled L2, as torch), eps=1e-10, nonfinite="ignore".
    State: s (4 B/param).
    """

    hparams_class = AdagradHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("eps",), sparse_ok=True)

    def __init__(self, params: Any, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 nonfinite: str = "ignore", **kwargs: Any) -> None:
        AdagradHParams(lr=lr, eps=eps, weight_decay=weight_decay, nonfinite=nonfinite, **kwargs)
        self._nonfinite_default = nonfinite
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, **kwargs)
        self.defaults["nonfinite"] = nonfinite

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        if "sum" not in state:
            return None
        t = _step_of(state)
        return float(group["lr"]) / (1 + (t - 1) * group.get("lr_decay", 0.0)) / (state["sum"].float().sqrt() + group["eps"])


def _step_of(state: Mapping[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)
