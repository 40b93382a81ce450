"""torch's own SGD, AdamW and Adagrad, not rewritten: thin subclasses that validate their
hyperparameters with this package's messages and add ``health()``.

The update rules are torch's (foreach / fused paths included); see ``torch.optim``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._validate import CheckedGroups, check_betas, check_eps, check_lr, check_range, check_weight_decay
from .health import torch_optimizer_health

__all__ = ["SGD", "AdamW", "Adagrad"]


class SGD(CheckedGroups, torch.optim.SGD):
    """``torch.optim.SGD``: ``b ← μ·b + g``; ``W ← W − η·(g + μ·b if nesterov else b)`` (+ L2 decay).

    Args: lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0 (coupled L2, as torch), nesterov=False.
    The studies' SGD uses heavy-ball momentum 0.98 (Zhao et al. 2025). State: momentum buffer (4 B/param).
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0, **kwargs: Any) -> None:
        check_lr(lr)
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        check_weight_decay(weight_decay)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)


class AdamW(CheckedGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

    Args: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01. State: m, v (8 B/param).
    """

    def __init__(
        self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.01, **kwargs: Any,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_eps(eps)
        check_weight_decay(weight_decay)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)


class Adagrad(CheckedGroups, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (Duchi et al. 2011): ``s ← s + g²``; ``W ← W − η·g/(sqrt(s) + ε)``.

    Args: lr=1e-2, lr_decay=0, weight_decay=0 (coupled L2, as torch), eps=1e-10. State: s (4 B/param).
    """

    def __init__(self, params: Any, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0, **kwargs: Any) -> None:
        check_lr(lr)
        check_eps(eps)
        check_weight_decay(weight_decay)
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, **kwargs)

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)
