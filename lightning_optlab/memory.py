"""Memory per rank: weights, gradients and optimizer state, from shapes alone (no step is taken).

:func:`state_bytes` estimates the optimizer state of one parameter from the optimizer's class, its
param group's hyperparameters and the parameter's shape, following each optimizer's state layout:

==================  ======================================================================
AdamW, Sophia,      2 moments (Sophia: momentum and the Hessian estimate; Schedule-Free: z
Schedule-Free       and the second moment)
Lion, Signum        1 momentum
SGD                 1 momentum buffer if momentum > 0, else nothing
Adagrad             1 accumulator
Adafactor           the momentum (beta1 > 0) + a row and a column second moment for a matrix
                    (a vector keeps a full one)
Adalayer, Adam-mini the momentum + one second moment per block (Adam-mini: per row or head)
SOAP                2 moments + for each dimension ``d ≤ max_precond_dim`` a ``d × d`` factor
                    and a ``d × d`` eigenbasis (vectors only with ``precondition_1d``)
Shampoo             the momentum + the graft's moment + for each dimension a ``d × d`` factor
                    and a ``d × d`` inverse root (matrices only)
Muon                1 momentum (the per-role mix sends vectors to its other optimizer)
==================  ======================================================================

The estimate counts tensors only (step counters and scalar bookkeeping are ignored); the
tests compare it with the bytes of a real optimizer's state after its first refreshes.

:func:`memory_per_rank` splits the totals over ranks for a strategy: under DDP every rank holds
the weights, the gradients and the diagonal methods' state; under FSDP2 those are sharded
``1/world``. The whole-tensor methods (SOAP, Shampoo, Muon, Adafactor, Adalayer, Adam-mini) keep a
parameter's state, moments and factors alike, on its owner rank under both strategies
(:mod:`lightning_optlab.optim.distributed`; the owners are balanced by cost, so a rank holds about
``1/world`` of it), unless ``distribute="replicate"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .optim.kronecker import factor_mask, work_shape

__all__ = ["state_bytes", "optimizer_state_bytes", "measured_state_bytes", "MemoryEstimate", "memory_per_rank",
           "format_memory_table", "parallel_layout"]

#: bytes of state per parameter: (shape, group hyperparameters, element size) -> (element-wise bytes, factor bytes)
Rule = Callable[[Sequence[int], Mapping[str, Any], int], "tuple[int, int]"]


def _n(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _moments(k: int) -> Rule:
    return lambda shape, group, b: (k * _n(shape) * b, 0)


def _sgd(shape: Sequence[int], group: Mapping[str, Any], b: int) -> tuple[int, int]:
    return (_n(shape) * b if group.get("momentum", 0) else 0, 0)


def _adafactor(shape: Sequence[int], group: Mapping[str, Any], b: int) -> tuple[int, int]:
    momentum = _n(shape) if group.get("betas", (0.9,))[0] > 0 else 0
    if len(shape) >= 2:  # factored over the last two dimensions
        second = _n(shape[:-1]) + _n(shape[:-2]) * shape[-1]
    else:
        second = _n(shape)
    return ((momentum + second) * b, 0)


def _blocks(per_row: bool) -> Rule:
    def rule(shape: Sequence[int], group: Mapping[str, Any], b: int) -> tuple[int, int]:
        blocks = shape[0] if per_row and len(shape) >= 2 else 1
        return ((_n(shape) + blocks) * b, 0)
    return rule


def _soap(shape: Sequence[int], group: Mapping[str, Any], b: int) -> tuple[int, int]:
    dims = work_shape(shape, group["max_precond_dim"], group.get("merge_dims", False))
    mask = factor_mask(tuple(shape), group["max_precond_dim"], group.get("precondition_1d", False),
                       group.get("merge_dims", False))
    factors = sum(2 * d * d for d, keep in zip(dims, mask) if keep)  # factor + eigenbasis
    return (2 * _n(shape) * b, factors * b)


def _shampoo(shape: Sequence[int], group: Mapping[str, Any], b: int) -> tuple[int, int]:
    diag = _n(shape) * (int(group["betas"][0] > 0) + int(group.get("grafting") in ("adam", "adagrad", "rmsprop")))
    factors = 0
    if len(shape) >= 2:
        dims = work_shape(shape, group["max_precond_dim"], group.get("merge_dims", False))
        mask = factor_mask(tuple(shape), group["max_precond_dim"], False, group.get("merge_dims", False))
        factors = sum(2 * d * d for d, keep in zip(dims, mask) if keep)  # factor + inverse root
    return (diag * b, factors * b)


#: leaf optimizer class name -> its state layout
RULES: dict[str, Rule] = {
    "AdamW": _moments(2), "Adam": _moments(2), "Sophia": _moments(2), "ScheduleFreeAdamW": _moments(2),
    "Lion": _moments(1), "Signum": _moments(1), "Adagrad": _moments(1), "Muon": _moments(1),
    "SGD": _sgd, "Adafactor": _adafactor, "Adalayer": _blocks(per_row=False), "AdamMini": _blocks(per_row=True),
    "SOAP": _soap, "Shampoo": _shampoo,
}


def state_bytes(optimizer_class: str, shape: Sequence[int], group: Mapping[str, Any],
                element_size: int = 4) -> Optional[tuple[int, int]]:
    """``(element-wise bytes, factor bytes)`` of one parameter's state, or None for an unknown class.

    Element-wise state has the parameter's shape (it shards with it); factor bytes are a matrix
    method's Kronecker factors, bases and roots (held whole, on the owner rank).

    >>> state_bytes("SOAP", (512, 2048), {"max_precond_dim": 1024})
    (8388608, 2097152)
    """
    rule = RULES.get(optimizer_class)
    return None if rule is None else rule(tuple(shape), group, element_size)


def optimizer_state_bytes(optimizer: Any) -> dict[str, Any]:
    """The estimated state of a built optimizer (a per-role mix included): ``{"elementwise": bytes,
    "factors": bytes, "unknown": [class names without a rule]}``. Works on meta parameters."""
    from .optim.base import iter_leaf_optimizers, optimizer_traits

    out: dict[str, Any] = {"elementwise": 0, "factors": 0, "owned_elementwise": 0, "owned_factors": 0,
                           "unknown": []}
    for leaf in iter_leaf_optimizers(optimizer):
        name = type(leaf).__name__
        # whole-tensor methods keep each parameter's state on its owner rank (optim/distributed.py)
        owned = optimizer_traits(leaf).whole_tensors and getattr(leaf, "distribute", "owner") == "owner"
        for group in leaf.param_groups:
            for p in group["params"]:
                est = state_bytes(name, p.shape, group, max(p.element_size(), 4) if name in ("SOAP", "Shampoo")
                                  else p.element_size())
                if est is None:
                    if name not in out["unknown"]:
                        out["unknown"].append(name)
                    continue
                out["elementwise"] += est[0]
                out["factors"] += est[1]
                if owned:
                    out["owned_elementwise"] += est[0]
                    out["owned_factors"] += est[1]
    return out


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state_dict()["state"]`` (lists of tensors included)."""
    def walk(x: Any) -> Iterable[torch.Tensor]:
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, Mapping):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v)

    return sum(t.numel() * t.element_size() for t in walk(optimizer.state_dict()["state"]) if t.dim() > 0)


@dataclass(kw_only=True)
class MemoryEstimate:
    """Bytes per rank of one training set-up."""

    #: strategy the split follows: "ddp" (replicated) or "fsdp2" (sharded, factors on owner ranks)
    strategy: str
    #: processes (devices × nodes)
    world_size: int
    weights: int
    gradients: int
    #: element-wise optimizer state (moments, accumulators)
    state: int
    #: Kronecker factors, bases and roots of matrix methods
    factors: int
    #: optimizer classes whose state is not estimated
    unknown: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp2', got {self.strategy!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {self.world_size}")

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.state + self.factors


def memory_per_rank(params: Iterable[torch.Tensor], optimizer: Any, *, strategy: str,
                    world_size: int) -> MemoryEstimate:
    """Per-rank bytes of weights, gradients and optimizer state for ``strategy`` on ``world_size`` ranks."""
    params = list(params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    st = optimizer_state_bytes(optimizer)
    div = world_size if strategy == "fsdp2" else 1
    if strategy == "fsdp2":
        state, factors = _ceil(st["elementwise"], world_size), _ceil(st["factors"], world_size)
    else:  # DDP: the diagonal methods' state on every rank, the whole-tensor methods' on owner ranks
        state = st["elementwise"] - st["owned_elementwise"] + _ceil(st["owned_elementwise"], world_size)
        factors = st["factors"] - st["owned_factors"] + _ceil(st["owned_factors"], world_size)
    return MemoryEstimate(strategy=strategy, world_size=world_size, weights=_ceil(weights, div),
                          gradients=_ceil(grads, div), state=state, factors=factors, unknown=tuple(st["unknown"]))


def parallel_layout(trainer: dict[str, Any]) -> tuple[str, int]:
    """``("ddp" | "fsdp2", world size)`` of a config's ``trainer`` block, for the memory estimate.

    FSDP2 is Lightning's ``ModelParallelStrategy`` (or ``FSDPStrategy``/``"fsdp"``); its world is
    the data-parallel size when given, else devices × nodes. Anything else replicates (DDP). A
    device count that is not a number (``"auto"``, ``-1``, a list) counts as given by its length,
    or 1."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str):
        devices = int(devices) if devices.strip().lstrip("-").isdigit() else 1
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    world = devices * int(nodes)
    strategy = trainer.get("strategy") or "auto"
    if isinstance(strategy, dict):
        name = str(strategy.get("class_path", "")).rsplit(".", 1)[-1]
        init = strategy.get("init_args") or {}
        if name in ("ModelParallelStrategy", "FSDPStrategy"):
            dp = init.get("data_parallel_size", "auto")
            return "fsdp2", dp if isinstance(dp, int) and dp > 0 else world
        return "ddp", world
    return ("fsdp2" if str(strategy).startswith("fsdp") else "ddp"), world


def _ceil(x: int, d: int) -> int:
    return -(-x // d)


def _gib(x: int) -> str:
    return f"{x / 2**30:8.2f} GiB"


def format_memory_table(estimates: Mapping[str, MemoryEstimate]) -> str:
    """A small table: one row per label (optimizer run), columns weights, grads, state, factors, total."""
    head = f"  {'run':<18} {'strategy':<12} {'weights':>12} {'gradients':>12} {'opt state':>12} {'factors':>12} {'total':>12}"
    rows = [head]
    for label, e in estimates.items():
        rows.append(f"  {label:<18} {e.strategy + ' x' + str(e.world_size):<12} {_gib(e.weights):>12} "
                    f"{_gib(e.gradients):>12} {_gib(e.state):>12} {_gib(e.factors):>12} {_gib(e.total):>12}"
                    + (f"  (state of {', '.join(e.unknown)} not estimated)" if e.unknown else ""))
    return "\n".join(rows)
