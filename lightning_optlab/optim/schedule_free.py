"""Schedule-Free AdamW: the official ``schedulefree`` package's optimizer, not rewritten, with ``health()``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import schedulefree
import torch
from torch import Tensor

from ._validate import check_betas, check_eps, check_lr, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool
from .health import HealthMixin, quantile_stats, update_stats

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeAdamWHParams", "TRAIN_WEIGHT_KEY"]

#: per-parameter state key for the exact training weights y stored beside eval-mode checkpoints
TRAIN_WEIGHT_KEY = "train_weight"


@dataclass(kw_only=True)
class ScheduleFreeAdamWHParams(HParams):
    #: learning rate γ (≥ 0)
    lr: float = 0.0025
    #: (β1, β2): the interpolation and the second-moment decay, each in [0, 1)
    betas: tuple[float, float] = (0.9, 0.999)
    #: ε (> 0)
    eps: float = 1e-8
    #: weight decay λ at y (≥ 0)
    weight_decay: float = 0.0
    #: linear learning-rate warmup steps (integer ≥ 0)
    warmup_steps: int = 0
    #: polynomial weighting power of the average (≥ 0)
    r: float = 0.0
    #: the averaging weight's power of the learning rate (≥ 0)
    weight_lr_power: float = 2.0
    #: the foreach path
    foreach: bool = True

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer ≥ 0, got {self.warmup_steps!r}")
        check_range("r", self.r, 0.0, float("inf"))
        check_range("weight_lr_power", self.weight_lr_power, 0.0, float("inf"))
        check_bool("foreach", self.foreach)


class ScheduleFreeAdamW(OptlabOptimizer, HealthMixin, schedulefree.AdamWScheduleFree):
    """Schedule-Free AdamW: z ← z − γ·ĝ, x ← (1−c)·x + c·z, gradients taken at y = (1−β1)·z + β1·x.

    ĝ is the Adam-normalized gradient g / (sqrt(v / (1−β2^t)) + ε) plus the weight decay λ·y,
    c = w_t / Σ w_i with w_t = t^r·γ_max^p. The update rule, its foreach path and the
    ``train()``/``eval()`` switch are ``schedulefree.AdamWScheduleFree``'s; this class adds
    argument validation and :meth:`health`.

    During training the parameters hold y; ``eval()`` switches them to x (the weights to evaluate
    and to checkpoint), ``train()`` back to y. In Lightning the
    :class:`~lightning_optlab.callbacks.ScheduleFreeModeSwitch` callback does this (the
    configurator attaches it). No LR schedule is needed besides ``warmup_steps``.

    Departure from upstream: a new optimizer starts in train mode (upstream starts in eval mode
    and refuses ``step()`` until ``train()`` is called). Before the first step x = y = z, so this
    changes nothing but the flag; ``train()``/``eval()`` calls work as upstream.

    Args:
        params: parameters, (name, parameter) pairs or param-group dicts.
        lr: γ (default 0.0025, upstream's).
        betas: (β1, β2): the interpolation and the second-moment decay (default (0.9, 0.999)).
        eps: ε (default 1e-8).
        weight_decay: λ, applied at y inside ĝ as upstream does (default 0).
        warmup_steps: linear learning-rate warmup steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: p, the averaging weight's power of the learning rate (default 2).
        foreach: use the foreach path (default: when torch has it).

    Example:
        >>> opt = ScheduleFreeAdamW(model.parameters(), lr=2e-3, warmup_steps=100)
        >>> ...  # training steps
        >>> opt.eval(); evaluate(model); opt.train()

    Paper: Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled" (2024),
    arXiv:2405.15682; code: github.com/facebookresearch/schedule_free.
    """

    hparams_class = ScheduleFreeAdamWHParams
    traits = Traits(mup_family="adam", mup_eps_keys=("eps",), replaces_schedule=True, eval_mode=True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: Optional[bool] = None,
        nonfinite: str = "ignore",
    ) -> None:
        if foreach is None:
            foreach = hasattr(torch, "_foreach_mul_")
        ScheduleFreeAdamWHParams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                 r=r, weight_lr_power=weight_lr_power, foreach=foreach, nonfinite=nonfinite)
        self._nonfinite_default = nonfinite
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
        )
        self.defaults["nonfinite"] = nonfinite
        self.train()
        # id(param) -> (weak reference to its .grad after the last step, that tensor's version):
        # upstream leaves the z step's direction in .grad; health() reads it while it is intact.
        self._last_directions: dict[int, tuple[weakref.ref, int]] = {}

    def _update(self) -> None:
        """Upstream's step; also notes (Python only, no kernel) where the step's direction lies."""
        schedulefree.AdamWScheduleFree.step(self)
        self._last_directions = {
            id(p): (weakref.ref(p.grad), p.grad._version) for g in self.param_groups for p in g["params"] if p.grad is not None
        }

    def train(self) -> None:
        """Switch parameters to the training sequence y (upstream's ``train()``).

        If the loaded state carries ``"train_weight"`` entries (written by the Lightning
        ``ScheduleFreeModeSwitch`` into checkpoints saved in eval mode), y is restored from them
        bit-exactly instead of being recomputed from x, so a resumed run matches an
        uninterrupted one.
        """
        super().train()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and TRAIN_WEIGHT_KEY in state:
                        p.copy_(state.pop(TRAIN_WEIGHT_KEY))

    def _last_direction(self, p: Tensor) -> Optional[Tensor]:
        """ĝ of the last step (normalized gradient + λ·y), if ``p.grad`` still holds it untouched."""
        entry = self._last_directions.get(id(p))
        grad = p.grad
        if entry is None or grad is None or entry[0]() is not grad or grad._version != entry[1]:
            return None
        return grad

    @property
    def train_mode(self) -> bool:
        """True when the parameters hold the training sequence y (every group in train mode)."""
        return all(g["train_mode"] for g in self.param_groups)

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        """eff_lr_* = γ_t / (sqrt(v / (1−β2^k)) + ε) as upstream's last step used them, eps_frac, train_mode.

        γ_t is the warmed-up learning rate of the last step (``scheduled_lr``); k the group's step
        count. That is the step size of z; y moves by a c- and β1-dependent fraction of it.
        ``update_rms``/``update_to_weight``: z's last step γ_t·ĝ (weight decay included, upstream
        folds it into ĝ), reported only while ``p.grad`` still holds ĝ (upstream normalizes the
        gradient in place and keeps no other copy), i.e. between ``step()`` and ``zero_grad()``.
        """
        k = group["k"]
        if "exp_avg_sq" not in state or k == 0:
            return {"train_mode": float(group["train_mode"])}
        beta2 = group["betas"][1]
        lr = float(group["scheduled_lr"])
        v = state["exp_avg_sq"].to(torch.promote_types(p.dtype, torch.float32))
        sqrt_v_hat = (v / (1 - beta2**k)).sqrt()
        out = quantile_stats("eff_lr", lr / (sqrt_v_hat + group["eps"]))
        out["eps_frac"] = (sqrt_v_hat < group["eps"]).float().mean().item()
        out["train_mode"] = float(group["train_mode"])
        direction = self._last_direction(p)
        if direction is not None:
            out.update(update_stats(p, lr * direction))
        return out
