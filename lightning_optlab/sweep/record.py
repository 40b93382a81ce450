"""``CurveRecorder``: the loss curve of one sweep point (steps and wall-clock), kept across resumes."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["CurveRecorder", "read_curve"]

_FIELDS = ("step", "train_seconds", "train_loss", "val_loss")


class CurveRecorder(Callback):
    """Records ``(step, training seconds, training loss, validation loss)`` for the report's curves.

    Training seconds come from the :class:`~lightning_optlab.callbacks.WallClock` given (validation
    excluded, continued across a resume); the curve is saved in checkpoints, so a resumed point's
    curve continues the interrupted one.

    Args:
        clock: the run's WallClock (placed before this callback in ``trainer.callbacks``).
    """

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock
        self.curve: list[dict[str, float | None]] = []
        self._step_losses: list[float] = []

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._step_losses.append(float(loss))
        step = trainer.global_step
        if (not self.curve or self.curve[-1]["step"] != step) and self._step_losses:  # an optimizer step completed
            mean = sum(self._step_losses) / len(self._step_losses)
            self._step_losses = []
            self.curve.append({"step": step, "train_seconds": float(self.clock.summary["train_seconds"]),
                               "train_loss": mean, "val_loss": None})

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/loss" not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics["val/loss"])
        if self.curve and self.curve[-1]["step"] == trainer.global_step:
            self.curve[-1]["val_loss"] = value
        else:
            self.curve.append({"step": trainer.global_step, "train_seconds": float(self.clock.summary["train_seconds"]),
                               "train_loss": None, "val_loss": value})

    def state_dict(self) -> dict[str, Any]:
        return {"curve": [dict(r) for r in self.curve]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = [dict(r) for r in state_dict.get("curve", [])]

    def write(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_FIELDS)
            w.writeheader()
            for r in self.curve:
                w.writerow({k: "" if r.get(k) is None else r[k] for k in _FIELDS})


def read_curve(path: str | Path) -> list[dict[str, float | None]]:
    """A ``curve.csv`` as rows of floats (None where a value is missing)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
    for r in rows:
        if r["step"] is not None and math.isfinite(r["step"]):
            r["step"] = int(r["step"])
    return rows
