"""Learning-rate schedules that learn the run's length from the Trainer.

LightningCLI builds a scheduler from the config with only the optimizer; the number of optimizer
steps is known once the Trainer has its data. ``core.optimisation.optimizer_config`` hands
``trainer.estimated_stepping_batches`` to a schedule whose ``total_steps`` was left unset.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class CosineSchedule(LambdaLR):
    """Linear warm-up over ``warmup_steps`` (0: none, the ProCIR paper's setting), then cosine decay
    from the base LR to ``min_ratio`` × base LR at ``total_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None, warmup_steps: int = 0,
                 min_ratio: float = 0.0) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps or 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
