"""Surfaces the data pipelines' health: corrupt samples skipped, and padding in training batches."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.interfaces import ReportsPadding, RetrievalData


class SkippedSamplesLogger(Callback):
    """Logs ``data/skipped_samples`` (summed over ranks) after every train and validation epoch,
    and ``data/padding_fraction`` (averaged over ranks) after every train epoch.

    The skip count comes from the DataModule's ``skipped_total`` (``RetrievalData``), which totals
    the per-worker counters that travel with each batch; the padding fraction from its
    ``padding_fraction`` (``ReportsPadding``): the padded share of the epoch's image slots, the
    number ``data.init_args.bucket_batches`` lowers. Other DataModules log nothing.
    """

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, RetrievalData):
            return
        pl_module.log("data/skipped_samples", float(dm.skipped_total), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)
        dm = trainer.datamodule
        if isinstance(dm, ReportsPadding):
            fraction = dm.padding_fraction(reset=True)
            if fraction is not None:
                pl_module.log("data/padding_fraction", fraction, reduce_fx="mean", sync_dist=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)
