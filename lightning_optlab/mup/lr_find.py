"""An LR range test that keeps μP's per-group learning-rate ratios and reports the *base* learning rate.

Lightning's ``lr_find`` writes one learning rate into every param group, which erases μP's
per-group multipliers (and any per-role override). This range test (Smith 2017, "Cyclical Learning
Rates", §3.3) moves a base learning rate η_b geometrically from ``min_lr`` to ``max_lr`` and sets
every group to ``η_b × ratio_g``, where ``ratio_g`` is the group's learning rate over the spec's
when the optimizer was built (``mup_lr_ratio``, written by the μP rewrite). The suggestion is the
base LR at the steepest descent of the smoothed loss (Lightning's rule), so it goes back into the
recipe's ``optimizer.lr`` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["LRFindResult", "lr_range_test", "group_lr_ratios"]


@dataclass
class LRFindResult:
    """Base learning rates tried, their smoothed losses, and the suggestion."""

    #: base learning rates, one per step
    lrs: list[float] = field(default_factory=list)
    #: exponentially smoothed training losses (bias-corrected), one per step
    losses: list[float] = field(default_factory=list)
    #: base LR at the steepest descent of the smoothed loss
    suggestion: float | None = None
    #: base LR at the lowest smoothed loss
    lr_at_min: float | None = None


def group_lr_ratios(optimizer: torch.optim.Optimizer, base_lr: float) -> list[float]:
    """Each group's learning rate over ``base_lr`` (μP's ``mup_lr_ratio`` when present)."""
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0 to take ratios, got {base_lr}")
    return [float(g.get("mup_lr_ratio", g["lr"] / base_lr)) for g in optimizer.param_groups]


def lr_range_test(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Tensor], loss_fn: Callable[[nn.Module, Tensor], Tensor],
    *, base_lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, num_steps: int = 100, smoothing: float = 0.05,
    divergence: float = 4.0,
) -> LRFindResult:
    """Run the range test; the optimizer's groups keep their ratios to ``base_lr`` (the spec's lr).

    Args:
        model, optimizer: the model and the optimizer built from its spec (with μP when asked).
        batches: at least ``num_steps`` batches (cycled if fewer).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        base_lr: the spec's learning rate the optimizer was built with.
        min_lr, max_lr: the range of the *base* learning rate (0 < min_lr < max_lr).
        num_steps: steps (≥ 2); stops early once the smoothed loss exceeds ``divergence`` × its minimum.
    The model and optimizer are changed in place: run it on a copy, then build afresh.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be ≥ 2, got {num_steps}")
    ratios = group_lr_ratios(optimizer, base_lr)
    batches = list(batches)
    if not batches:
        raise ValueError("lr_range_test needs at least one batch")
    result = LRFindResult()
    avg, best = 0.0, math.inf
    for step in range(num_steps):
        lr = min_lr * (max_lr / min_lr) ** (step / (num_steps - 1))
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * r
        loss = loss_fn(model, batches[step % len(batches)])
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        avg = smoothing * value + (1 - smoothing) * avg
        smoothed = avg / (1 - (1 - smoothing) ** (step + 1))
        result.lrs.append(lr)
        result.losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > divergence * best:
            break
    if len(result.losses) >= 3:
        logs = [math.log(l) for l in result.lrs]
        slopes = [(result.losses[i + 1] - result.losses[i - 1]) / (logs[i + 1] - logs[i - 1])
                  for i in range(1, len(result.losses) - 1)]
        i = min(range(len(slopes)), key=slopes.__getitem__) + 1
        result.suggestion = result.lrs[i]
        result.lr_at_min = result.lrs[min(range(len(result.losses)), key=result.losses.__getitem__)]
    return result
