"""``CausalLMModule``: next-token training of any logits-producing model with an ``OptimizerSpec``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..configure import OptimizerSpec, configure
from ..optim.sophia import sophia_gnb_estimate

__all__ = ["CausalLMModule"]


class CausalLMModule(L.LightningModule):
    """Trains ``model`` (token ids → logits) on batches of token ids ``(B, T + 1)``.

    Args:
        model: an ``nn.Module`` mapping ``(B, T)`` token ids to ``(B, T, V)`` logits; if it has a
            ``loss(logits, targets)`` method (z-loss, ...) that is used for training.
        optimizer: the :class:`OptimizerSpec` (name, lr, betas, schedule, per-role overrides, mix).
        sophia_seed: seed of the label sampling of Sophia-G's estimator (offset by the step).

    Sophia's Gauss-Newton-Bartlett estimator is run from the training step's own logits every
    ``update_period`` steps (a no-op for every other optimizer).
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerSpec | None = None, sophia_seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.spec = optimizer or OptimizerSpec()
        self.sophia_seed = sophia_seed

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _loss(self, logits: Tensor, targets: Tensor, train: bool) -> Tensor:
        if train and hasattr(self.model, "loss"):
            return self.model.loss(logits, targets)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        loss = self._loss(logits, y, train=True)
        # The sampled labels come from a generator seeded by the step, so a resumed run draws
        # exactly what the uninterrupted run drew (the global RNG is not checkpointed).
        gen = torch.Generator(device=logits.device).manual_seed(self.sophia_seed + self.global_step)
        sophia_gnb_estimate(self.optimizers(), logits, generator=gen)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        loss = self._loss(self(x), y, train=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return configure(self, self.spec)
