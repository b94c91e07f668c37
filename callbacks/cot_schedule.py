"""ProCIR's progressive caption removal: the CoT keep ratio ρ(t), set before every training step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


def keep_ratio(step: int, total_steps: int, removal_fraction: float = 0.5) -> float:
    """ρ(t) = max(0, 1 − t / (removal_fraction · T)): 1 at the start, 0 from ``removal_fraction·T`` on."""
    return max(0.0, 1.0 - step / max(removal_fraction * total_steps, 1e-9))


class CoTSchedule(Callback):
    """Sets ``pl_module.cot_keep_ratio`` to ρ(global step) before each training batch (ProCIR's
    ``CoTRatioSchedule`` interface).

    T is the run's number of optimizer steps (``trainer.estimated_stepping_batches``); with the
    paper's ``removal_fraction`` 0.5 no caption token reaches the model from T/2 on. Evaluation
    never uses captions, whatever ρ is (the model checks ``self.training``).
    """

    def __init__(self, removal_fraction: float = 0.5) -> None:
        if not 0 < removal_fraction <= 1:
            raise ValueError(f"CoTSchedule.removal_fraction={removal_fraction}: must be in (0, 1]")
        self.removal_fraction = removal_fraction

    def keep_ratio_at(self, step: int, total_steps: int) -> float:
        return keep_ratio(step, total_steps, self.removal_fraction)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.cot_keep_ratio = self.keep_ratio_at(trainer.global_step, int(trainer.estimated_stepping_batches))
