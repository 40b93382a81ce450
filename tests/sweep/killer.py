"""A callback that kills its process once (a crashed sweep point), imported by the point's subprocess."""

import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillOnce(Callback):
    """``os._exit(9)`` after optimizer step ``at_step`` of the run with learning rate ``lr``, once (``marker``)."""

    def __init__(self, at_step: int, lr: float, marker: str) -> None:
        self.at_step, self.lr, self.marker = at_step, lr, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.at_step and pl_module.spec.lr == self.lr and not self.marker.exists():
            self.marker.write_text("killed")
            os._exit(9)  # no cleanup, no exception handlers: like SIGKILL or a lost node
