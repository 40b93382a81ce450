"""Hyperparameter checks shared by every optimizer: errors name the value and the allowed range."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "check_lr", "check_betas", "check_beta", "check_eps", "check_weight_decay", "check_positive_int", "check_range",
    "rollback_group",
]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (str, bytes)):
        hint = " (PyYAML reads 3e-4 as a string: write 3.0e-4)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a number, got the string {value!r}; pass a float{hint}")
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_lr(lr: Any) -> None:
    """lr ≥ 0."""
    if _as_float("lr", lr) < 0:
        raise ValueError(f"lr must be ≥ 0, got {lr}; pass a non-negative learning rate such as 3e-4")


def check_beta(name: str, beta: Any) -> None:
    """0 ≤ beta < 1."""
    b = _as_float(name, beta)
    if not 0.0 <= b < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}")


def check_betas(betas: Sequence[Any], n: int = 2) -> None:
    """A tuple of ``n`` betas, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"betas must be a tuple of {n} numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_beta(f"betas[{i}]", b)


def check_eps(eps: Any, name: str = "eps") -> None:
    """eps > 0."""
    if _as_float(name, eps) <= 0:
        raise ValueError(f"{name} must be > 0, got {eps}; a typical value is 1e-8")


def check_weight_decay(weight_decay: Any) -> None:
    """weight_decay ≥ 0."""
    if _as_float("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")


def check_positive_int(name: str, value: Any) -> None:
    """An integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


def check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """lo ≤ value ≤ hi (bounds open where asked)."""
    v = _as_float(name, value)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")


@contextmanager
def rollback_group(optimizer: Any) -> Iterator[None]:
    """Undo an ``add_param_group`` whose checks fail: groups added inside the block are removed
    when it raises, so a rejected group leaves the optimizer as it was."""
    n = len(optimizer.param_groups)
    try:
        yield
    except Exception:
        del optimizer.param_groups[n:]
        raise
