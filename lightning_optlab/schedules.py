"""Learning-rate schedules with warmup, as torch ``LambdaLR`` schedulers.

Every schedule is a *factor* applied to each param group's own initial learning rate, so
per-group multipliers (μP's, or per-role overrides) are preserved: a group that starts at
``0.25 * lr`` stays at a quarter of the others throughout.

Factors, with ``w`` warmup steps, ``T`` total steps and floor ``f = min_lr_ratio``
(step ``s`` counts optimizer steps from 0):

* warmup (all schedules): ``(s + 1) / (w + 1)`` for ``s < w`` — the first step is not zero;
* ``constant``: 1;
* ``linear``: from 1 at ``s = w`` to ``f`` at ``s = T``;
* ``cosine``: ``f + (1 - f) · ½(1 + cos(π·p))``, ``p = (s - w)/(T - w)``;
* ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hägele et al. 2024): 1 until the last
  ``decay_fraction · T`` steps, then linear to ``f`` at ``T``.

After ``T`` the factor stays at ``f``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "ScheduleFactor", "build_scheduler", "schedule_warnings", "warn_schedule"]

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "wsd")


@dataclass
class ScheduleFactor:
    """A picklable LR factor ``step -> float`` (``LambdaLR`` saves its attributes in checkpoints)."""

    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer ≥ 0, got {self.warmup_steps!r}")
        if not 0.0 <= float(self.min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < float(self.decay_fraction) <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.schedule != "constant":
            if self.total_steps is None:
                raise ValueError(f"schedule {self.schedule!r} needs total_steps (the number of optimizer steps; "
                                 "under `optlab fit` trainer.max_steps sets it)")
            if self.total_steps <= self.warmup_steps:
                raise ValueError(
                    f"total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps}) "
                    f"for schedule {self.schedule!r}"
                )

    def __call__(self, step: int) -> float:
        w = self.warmup_steps
        if step < w:
            return (step + 1) / (w + 1)
        if self.schedule == "constant":
            return 1.0
        total = int(self.total_steps)  # validated in __post_init__
        floor = float(self.min_lr_ratio)
        if step >= total:
            return floor
        if self.schedule == "linear":
            return 1.0 - (1.0 - floor) * (step - w) / (total - w)
        if self.schedule == "cosine":
            progress = (step - w) / (total - w)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # wsd: stable, then a linear decay over the last decay_fraction of the run
        decay_start = max(w, total - int(round(self.decay_fraction * total)))
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - decay_start) / max(1, total - decay_start)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str = "constant",
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.1,
) -> LambdaLR:
    """A ``LambdaLR`` applying :class:`ScheduleFactor` to every param group of ``optimizer``.

    Example:
        >>> sched = build_scheduler(opt, "cosine", warmup_steps=200, total_steps=10_000, min_lr_ratio=0.1)
    """
    factor = ScheduleFactor(schedule, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    return LambdaLR(optimizer, lr_lambda=factor)


def schedule_warnings(schedule: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                      max_steps: int | None = None) -> list[str]:
    """What is legal but probably not meant in a schedule for a run of ``max_steps`` optimizer steps.

    * a schedule that ends (``total_steps``) before the run does: the LR sits at its floor for the rest;
    * a warmup that never ends within ``total_steps`` (or the run) under the ``constant`` schedule.
    """
    out = []
    end = total_steps if total_steps is not None else max_steps
    if schedule == "constant" and warmup_steps and end is not None and warmup_steps >= end:
        which = "total_steps" if total_steps is not None else "trainer.max_steps"
        out.append(f"warmup_steps ({warmup_steps}) ≥ {which} ({end}) under the constant schedule: the learning "
                   f"rate never reaches its peak (it ends at {end}/{warmup_steps + 1} of lr); lower warmup_steps")
    if schedule != "constant" and total_steps is not None and max_steps is not None and total_steps < max_steps:
        out.append(f"total_steps ({total_steps}) < trainer.max_steps ({max_steps}): the {schedule} schedule ends at "
                   f"step {total_steps} and the remaining {max_steps - total_steps} steps run at min_lr_ratio × lr; "
                   "set total_steps to max_steps (or leave it unset: optlab fit fills it in)")
    return out


def warn_schedule(schedule: str, *, warmup_steps: int = 0, total_steps: int | None = None,
                  max_steps: int | None = None) -> list[str]:
    """:func:`schedule_warnings`, each issued as a ``UserWarning``; returns them."""
    found = schedule_warnings(schedule, warmup_steps=warmup_steps, total_steps=total_steps, max_steps=max_steps)
    for message in found:
        warnings.warn(message, UserWarning, stacklevel=2)
    return found
