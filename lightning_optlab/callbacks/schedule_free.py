"""Train/eval switching of Schedule-Free optimizers around Lightning's loops and checkpoints."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..optim.base import iter_leaf_optimizers, optimizer_traits
from ..optim.schedule_free import TRAIN_WEIGHT_KEY, ScheduleFreeAdamW

__all__ = ["ScheduleFreeModeSwitch", "attach_schedule_free_switch", "schedule_free_optimizers"]


def _is_schedule_free(opt: Any) -> bool:
    """Declared (``traits.eval_mode``), or duck-typed for optimizers from outside the pack."""
    if optimizer_traits(opt).eval_mode:
        return True
    return (
        callable(getattr(opt, "train", None))
        and callable(getattr(opt, "eval", None))
        and any("train_mode" in g for g in getattr(opt, "param_groups", []))
    )


def schedule_free_optimizers(optimizers: Any) -> Iterator[Any]:
    """Optimizers with ``train()``/``eval()`` and a ``"train_mode"`` group key, found in ``optimizers``.

    Looks through lists, Lightning's ``LightningOptimizer`` (``.optimizer``) and mixes with
    ``children`` (the pack's one walker, :func:`~lightning_optlab.optim.base.iter_leaf_optimizers`).
    """
    return (opt for opt in iter_leaf_optimizers(optimizers) if _is_schedule_free(opt))


def _in_train_mode(opt: Any) -> bool:
    return all(g["train_mode"] for g in opt.param_groups if "train_mode" in g)


def _detached_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict whose tensors no longer share memory with the live ones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, OrderedDict):  # a module state_dict: keep its _metadata (versions)
        out = OrderedDict((k, _detached_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached_copy(v) for v in obj]
    return obj


class ScheduleFreeModeSwitch(Callback):
    """Keeps Schedule-Free optimizers in the right mode: y while training, x everywhere else.

    * train start and every train batch start: ``train()`` (parameters hold y);
    * validation / test / predict start: ``eval()`` (parameters hold x), and the previous mode
      back at their end; train end: ``eval()``, so a fitted module holds x;
    * saving a checkpoint in train mode: the checkpoint's ``state_dict`` and
      ``optimizer_states`` are rewritten in eval mode (x with the optimizer state that goes with
      it), and the training weights y are stored bit-exactly in each parameter's optimizer state
      (``"train_weight"``, for :class:`~lightning_optlab.optim.ScheduleFreeAdamW`); the live
      parameters go back to exactly y, so saving does not perturb training. A resumed run loads
      x, and ``train()`` restores the stored y, so it continues bit-identically.
      (A checkpoint so holds two copies of the weights.)

    Acts on every optimizer of the trainer with ``train()``/``eval()`` and a ``"train_mode"``
    group key (``schedulefree``'s, :class:`~lightning_optlab.optim.ScheduleFreeAdamW`, also
    inside an ``OptimizerMix``); does nothing for others. :func:`attach_schedule_free_switch`
    adds it to a running trainer (the configurator does so).

    Limitation: Lightning calls no callback hook for weights-only checkpoints
    (``save_weights_only=True``), so those are written in whatever mode the optimizer is in
    (x after validation, y in a mid-epoch save). The rewrite copies the model's weights once
    (one model's worth of host/device memory for the duration of the save).

    Example:
        >>> trainer = L.Trainer(callbacks=[ScheduleFreeModeSwitch()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._restore: list[tuple[Any, bool]] = []
        self._train_weights: dict[torch.Tensor, torch.Tensor] = {}

    @staticmethod
    def _optimizers(trainer: "pl.Trainer") -> list[Any]:
        return list(schedule_free_optimizers(list(getattr(trainer, "optimizers", []) or [])))

    def _switch(self, trainer: "pl.Trainer", train: bool) -> None:
        for opt in self._optimizers(trainer):
            if train and not _in_train_mode(opt):
                opt.train()
            elif not train and _in_train_mode(opt):
                opt.eval()

    def _enter_eval(self, trainer: "pl.Trainer") -> None:
        self._restore = [(opt, _in_train_mode(opt)) for opt in self._optimizers(trainer)]
        # y is put back bit-exactly afterwards (as around checkpoint saves): train() would recompute
        # it from x and z, off by rounding, and a run with validation would drift from one without
        self._train_weights = _copy_train_weights([opt for opt, was_train in self._restore if was_train])
        for opt, was_train in self._restore:
            if was_train:
                opt.eval()

    def _leave_eval(self) -> None:
        _back_to_train_weights([opt for opt, was_train in self._restore if was_train], self._train_weights)
        self._restore = []
        self._train_weights = {}

    # training
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._switch(trainer, train=True)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._switch(trainer, train=True)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._switch(trainer, train=False)

    # evaluation loops
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._enter_eval(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._leave_eval()

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._enter_eval(trainer)

    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._leave_eval()

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._enter_eval(trainer)

    def on_predict_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._leave_eval()

    # checkpoints
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        switched = [opt for opt in self._optimizers(trainer) if _in_train_mode(opt)]
        if not switched:
            return
        # y is kept bit-exactly: recomputing it from x after eval() would perturb training by
        # rounding at every save, and a resumed run could not match an uninterrupted one.
        train_weights = _copy_train_weights(switched)
        for opt in switched:
            opt.eval()
        try:
            # Copies: the live tensors go back to y below, before Lightning writes the file.
            checkpoint["state_dict"] = _detached_copy(trainer.strategy.lightning_module_state_dict())
            if "optimizer_states" in checkpoint:
                states = [_detached_copy(trainer.strategy.optimizer_state(opt)) for opt in trainer.optimizers]
                for opt, sd in zip(trainer.optimizers, states):
                    _attach_train_weights(opt, sd, train_weights)
                checkpoint["optimizer_states"] = states
        finally:
            _back_to_train_weights(switched, train_weights)


def _copy_train_weights(opts: list[Any]) -> dict[torch.Tensor, torch.Tensor]:
    """A copy of y (the parameters of optimizers in train mode), to put back bit-exactly."""
    return {p: p.detach().clone() for opt in opts for g in opt.param_groups for p in g["params"]}


@torch.no_grad()
def _back_to_train_weights(opts: list[Any], train_weights: dict[torch.Tensor, torch.Tensor]) -> None:
    """Train mode again with the copied y, instead of ``train()``'s recomputation from x and z."""
    for p, y in train_weights.items():
        p.copy_(y)
    for opt in opts:
        for group in opt.param_groups:
            if "train_mode" in group:
                group["train_mode"] = True


def _attach_train_weights(opt: Any, state_dict: dict[str, Any], train_weights: dict[torch.Tensor, torch.Tensor]) -> None:
    """Put y beside each parameter's state (parameters are numbered in param-group order, as
    ``Optimizer.state_dict`` and ``OptimizerMix.state_dict`` number them), for the optimizers
    whose ``train()`` restores it (:class:`~lightning_optlab.optim.ScheduleFreeAdamW`)."""
    owners = {id(p): child for child in schedule_free_optimizers(opt) for g in child.param_groups for p in g["params"]}
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            child = owners.get(id(p))
            if p in train_weights and child is not None and isinstance(child, ScheduleFreeAdamW):
                state_dict["state"].setdefault(index, {})[TRAIN_WEIGHT_KEY] = train_weights[p]
            index += 1


def attach_schedule_free_switch(module: Any) -> Optional[ScheduleFreeModeSwitch]:
    """Add a :class:`ScheduleFreeModeSwitch` to the trainer of ``module`` unless one is there.

    ``module`` is a LightningModule; its trainer is read from ``module._trainer`` (duck-typed).
    Returns the callback in use, or ``None`` when no trainer is attached (plain PyTorch use).
    Called from ``configure_optimizers`` it takes part from ``on_fit_start`` on.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, ScheduleFreeModeSwitch):
            return cb
    cb = ScheduleFreeModeSwitch()
    trainer.callbacks.append(cb)
    return cb
