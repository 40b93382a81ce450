"""The health protocol: cheap per-parameter statistics that every optimizer answers on demand.

``optimizer.health()`` returns a flat ``dict[str, float]`` keyed ``"<param name>/<stat>"``.
Parameter names come from the param group's ``"param_names"`` (the configurator and torch's
``named_parameters`` input put them there), else ``"group{i}.param{j}"``.

Common statistics (diagonal methods):

* ``eff_lr_min``, ``eff_lr_q05``, ``eff_lr_q50``, ``eff_lr_q95``, ``eff_lr_max``: quantiles of
  the per-coordinate effective learning rate, ``lr / (sqrt(v_hat) + eps)`` for Adam-like methods;
* ``eps_frac``: fraction of coordinates where ``eps`` dominates ``sqrt(v_hat)``;
* ``update_rms`` and ``update_to_weight``: RMS of the last update (reconstructed from the
  state, weight decay excluded) and its ratio to the parameter's RMS;
* optimizer-specific keys (``clip_frac`` for Sophia, ``block_eff_lr_*`` for Adalayer, ...).

Nothing here runs on the optimizer's hot path: statistics are computed only when asked.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

__all__ = [
    "QUANTILES",
    "HealthMixin",
    "named_params",
    "quantile_stats",
    "update_stats",
    "diagonal_stats",
    "torch_optimizer_health",
]

#: (key suffix, quantile) pairs reported for effective learning rates.
QUANTILES: tuple[tuple[str, float], ...] = (
    ("min", 0.0),
    ("q05", 0.05),
    ("q50", 0.5),
    ("q95", 0.95),
    ("max", 1.0),
)

# torch.quantile sorts (and refuses inputs above 2**24 elements): larger tensors are subsampled with a
# fixed stride, which keeps min/max exact and the inner quantiles accurate to sampling error
# (at 2**18 samples the rank of q05 is off by ~0.04% (one standard deviation)).
_MAX_QUANTILE_ELEMENTS = 1 << 18


def named_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
    """Yield ``(name, param, group)`` for every parameter of ``optimizer``."""
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for j, p in enumerate(group["params"]):
            name = names[j] if names is not None and j < len(names) else f"group{gi}.param{j}"
            yield name, p, group


def whole(t: Tensor) -> Tensor:
    """``t`` itself, or the whole tensor of a sharded DTensor (FSDP2): statistics are per logical
    parameter. A collective for a DTensor, so health statistics are computed on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def quantile_stats(prefix: str, values: Tensor) -> dict[str, float]:
    """Quantiles (min, 5%, 50%, 95%, max) of ``values`` as ``{prefix_min: ..., ...}``."""
    flat = whole(values.detach()).reshape(-1).float()
    if flat.numel() == 0:
        return {}
    lo, hi = flat.min().item(), flat.max().item()
    if flat.numel() > _MAX_QUANTILE_ELEMENTS:
        stride = flat.numel() // _MAX_QUANTILE_ELEMENTS + 1
        flat = flat[::stride]
    qs = torch.tensor([q for _, q in QUANTILES[1:-1]], dtype=flat.dtype, device=flat.device)
    inner = torch.quantile(flat, qs).tolist()
    out = {f"{prefix}_min": lo, f"{prefix}_max": hi}
    for (key, _), val in zip(QUANTILES[1:-1], inner):
        out[f"{prefix}_{key}"] = val
    return out


def update_stats(param: Tensor, update: Tensor) -> dict[str, float]:
    """RMS of ``update`` (already scaled by the learning rate) and its ratio to the weight RMS."""
    u_rms = whole(update.detach()).float().pow(2).mean().sqrt().item()
    w_rms = whole(param.detach()).float().pow(2).mean().sqrt().item()
    return {"update_rms": u_rms, "update_to_weight": u_rms / w_rms if w_rms > 0 else float("inf")}


def diagonal_stats(param: Tensor, lr: float, sqrt_v_hat: Tensor, eps: float, direction: Tensor) -> dict[str, float]:
    """Statistics of an Adam-like diagonal step ``lr * direction / (sqrt_v_hat + eps)``.

    ``sqrt_v_hat`` may be a broadcastable shape (one scalar per block, a rank-1 factor product).
    """
    sqrt_v_hat = whole(sqrt_v_hat.detach()).float()
    param, direction = whole(param.detach()), whole(direction.detach())
    denom = sqrt_v_hat + eps
    out = quantile_stats("eff_lr", (lr / denom).expand_as(param) if denom.numel() < param.numel() else lr / denom)
    out["eps_frac"] = (sqrt_v_hat < eps).float().mean().item()
    out.update(update_stats(param, lr * direction.float() / denom))
    return out


class HealthMixin:
    """Adds ``health()`` to an optimizer that implements ``_param_health(p, group, state)``."""

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Per-parameter statistics ``{"<name>/<stat>": value}``; empty before the first step.

        With owner ranks (:mod:`~lightning_optlab.optim.distributed`) each owner computes the
        statistics of its parameters on the whole tensors and every rank gets all of them: a
        collective, so call it on every rank."""
        distributor = getattr(self, "distributor", lambda: None)()
        if distributor is not None:
            return distributor.gather_health(self._health_of)
        return self._health_of(
            (name, p, group, self.state.get(p)) for name, p, group in named_params(self)  # type: ignore[arg-type,attr-defined]
        )

    def _health_of(self, items: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, p, group, state in items:
            if not state:
                continue
            for key, val in self._param_health(p, group, state).items():
                out[f"{name}/{key}"] = float(val)
        return out


def _step_of(state: dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def torch_optimizer_health(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Health statistics read from the state of torch's own SGD, Adam/AdamW and Adagrad.

    Also used for any optimizer whose state uses torch's key names (``exp_avg``,
    ``exp_avg_sq``, ``sum``, ``momentum_buffer``).
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, p, group in named_params(optimizer):
            state = optimizer.state.get(p)
            is_sgd = isinstance(optimizer, torch.optim.SGD)
            # torch's SGD without momentum keeps no state (its step is lr·grad); torch's Adagrad
            # creates its state at construction (step 0): nothing to report before its first step
            if (not state and not is_sgd) or ("sum" in (state or {}) and _step_of(state) == 0):
                continue
            state = state or {}
            lr = float(group["lr"])
            stats: dict[str, float]
            if "exp_avg_sq" in state:  # Adam / AdamW
                beta1, beta2 = group["betas"]
                t = _step_of(state)
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                sqrt_v_hat = (state["exp_avg_sq"] / bc2).sqrt()
                stats = diagonal_stats(p, lr, sqrt_v_hat, group["eps"], state["exp_avg"] / bc1)
            elif "sum" in state:  # Adagrad (lr decay applied as torch does)
                t = _step_of(state)
                clr = lr / (1 + (t - 1) * group.get("lr_decay", 0.0))
                sqrt_sum = state["sum"].sqrt()
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                stats = diagonal_stats(p, clr, sqrt_sum, group["eps"], grad)
            else:  # SGD: the effective learning rate is lr on every coordinate
                buf = state.get("momentum_buffer")
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if buf is None:
                    direction = grad
                elif group.get("nesterov"):
                    direction = grad + group["momentum"] * buf  # the direction torch stepped along
                else:
                    direction = buf
                stats = {f"eff_lr_{k}": lr for k, _ in QUANTILES}
                stats["eps_frac"] = 0.0
                if buf is not None or p.grad is not None:  # no state and no gradient: no step to size
                    stats.update(update_stats(p, lr * direction))
            for key, val in stats.items():
                out[f"{name}/{key}"] = float(val)
    return out
