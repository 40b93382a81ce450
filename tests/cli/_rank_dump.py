"""A callback for the distributed CLI tests: each rank writes its losses and final weights.

Imported by the ranks that ``optlab fit`` starts (the tests put this folder on ``PYTHONPATH``);
not a test module itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


class RankDump(Callback):
    """Write ``{out}/rank{global_rank}.pt``: this rank's training losses, world size and final weights."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"losses": self.losses, "world_size": trainer.world_size, "rank": trainer.global_rank,
                    "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__, "params": params}, Path(self.out) / f"rank{trainer.global_rank}.pt")
