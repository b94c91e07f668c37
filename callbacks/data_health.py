"""Surfaces the number of corrupt samples the shard pipelines skipped."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class SkippedSamplesLogger(Callback):
    """Logs ``data/skipped_samples`` (summed over ranks) after every train and validation epoch.

    The count comes from the DataModule's ``skipped_total``, which totals the per-worker counters
    that travel with each batch; a DataModule without it logs nothing.
    """

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "skipped_total"):
            return
        pl_module.log("data/skipped_samples", float(dm.skipped_total), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)
