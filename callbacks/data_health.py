"""Surfaces the number of corrupt samples the shard pipelines skipped."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.interfaces import RetrievalData


class SkippedSamplesLogger(Callback):
    """Logs ``data/skipped_samples`` (summed over ranks) after every train and validation epoch.

    The count comes from the DataModule's ``skipped_total`` (``RetrievalData``), which totals the
    per-worker counters that travel with each batch; other DataModules log nothing.
    """

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, RetrievalData):
            return
        pl_module.log("data/skipped_samples", float(dm.skipped_total), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)
