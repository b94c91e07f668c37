"""Moves a run from stage 1 (coarse alignment) to stage 2 (frozen target encoder, static bank)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from datamodules.interfaces import RetrievalData
from lightning_modules.core.interfaces import TwoStage


class StageSwitch(Callback):
    """At epoch ``switch_epoch`` freeze the target encoder, rebuild the optimizer without it, embed
    every product of the ``bank_split`` gallery into the static bank, and turn on the stage-2 loss.

    ``switch_epoch: 0`` (or a model configured with ``training_stage: 2``) runs stage 2 from the start, as a
    separate run initialised from a stage-1 checkpoint does. The bank is rebuilt every
    ``refresh_every`` epochs when set, and after a resume.

    Args:
        switch_epoch: first epoch of stage 2.
        refresh_every: rebuild the bank every this many epochs (None: once).
        bank_split: the split whose gallery forms the bank (all training products).
        hard_negatives: hard negatives mined per bank entry.
    """

    def __init__(self, switch_epoch: int = 1, refresh_every: int | None = None, bank_split: str = "train",
                 hard_negatives: int = 8) -> None:
        self.switch_epoch = switch_epoch
        self.refresh_every = refresh_every
        self.bank_split = bank_split
        self.hard_negatives = hard_negatives
        self.switched_at: int | None = None
        self.built_at: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, TwoStage):
            raise TypeError(f"StageSwitch needs a two-stage model; {type(pl_module).__name__} is not one "
                            "(CLIP4CIR and LLaVACaptionCIR are): remove the callback from trainer.callbacks")
        if not isinstance(trainer.datamodule, RetrievalData):
            raise TypeError("StageSwitch builds its bank from DataModule.eval_dataloaders: use a "
                            "datamodules.ShardDataModule (or a DataModule with the RetrievalData interface)")
        if stage == "fit" and self.switch_epoch == 0 and pl_module.training_stage == 1:
            pl_module.enter_stage2()  # before DDP wraps the model

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A run resumed inside a stage-2 epoch gets no on_train_epoch_start for that epoch: its bank
        # is built here (from the frozen encoder, so it equals the one the killed run had).
        if pl_module.training_stage == 2 and pl_module.bank is None:
            self._build(trainer, pl_module, trainer.current_epoch, record=self.built_at is None)

    def _build(self, trainer: Trainer, pl_module: LightningModule, epoch: int, record: bool = True) -> None:
        loader = trainer.datamodule.eval_dataloaders(self.bank_split)[0]
        bank = pl_module.build_bank(loader, hard_negatives=self.hard_negatives)
        if record:
            self.built_at = epoch
        rank_zero_info(f"StageSwitch: static bank of {len(bank)} {self.bank_split} products (epoch {epoch})")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if pl_module.training_stage == 1 and epoch >= self.switch_epoch:
            pl_module.enter_stage2()
            trainer.strategy.setup_optimizers(trainer)  # the frozen encoder leaves the optimizer
            rank_zero_info(f"StageSwitch: stage 2 from epoch {epoch}: target encoder frozen")
        if pl_module.training_stage != 2:
            return
        if self.switched_at is None:
            self.switched_at = epoch
        due = self.refresh_every and self.built_at is not None and epoch - self.built_at >= self.refresh_every
        if pl_module.bank is None or due:
            self._build(trainer, pl_module, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at, "built_at": self.built_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_at = state_dict.get("switched_at")
        # The bank is not checkpointed: on_train_start rebuilds it, and the refresh cadence goes on.
        self.built_at = state_dict.get("built_at")
