"""A callback that SIGKILLs its own process group at a chosen point of training: a crash (OOM,
preemption) at an exact, reproducible place, DataLoader workers and DDP ranks included."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAt(Callback):
    """Kill at the start of training step ``step``, of validation batch 1 of epoch ``validation_epoch``,
    or of the ``predict_batch``-th predict batch this process runs."""

    def __init__(self, step: int | None = None, validation_epoch: int | None = None,
                 predict_batch: int | None = None) -> None:
        self.step, self.validation_epoch, self.predict_batch = step, validation_epoch, predict_batch
        self.predicted = 0

    @staticmethod
    def _kill() -> None:
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self._kill()

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if (not trainer.sanity_checking and trainer.current_epoch == self.validation_epoch and dataloader_idx == 1
                and batch_idx == 0):
            self._kill()

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if self.predicted == self.predict_batch:
            self._kill()
        self.predicted += 1
