"""torch's own SGD, AdamW and Adagrad, not rewritten: thin subclasses that add ``health()``.

The update rules are torch's (foreach / fused paths included); see ``torch.optim``.
"""

from __future__ import annotations

import torch

from .health import torch_optimizer_health

__all__ = ["SGD", "AdamW", "Adagrad"]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (heavy-ball or Nesterov momentum) with ``health()``.

    The studies' SGD uses momentum 0.98 (Zhao et al. 2025).
    """

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019) with ``health()``."""

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)


class Adagrad(torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (Duchi et al. 2011) with ``health()``."""

    def health(self) -> dict[str, float]:
        return torch_optimizer_health(self)
