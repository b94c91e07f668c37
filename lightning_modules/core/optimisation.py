"""Optimizers and schedules from the config: parameter groups, and the run's length for schedules."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from .schedules import CosineSchedule


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def total_training_steps(trainer: L.Trainer) -> int:
    """The run's optimizer steps, for schedules; a clear error when the Trainer cannot tell."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"the LR schedule needs the run's number of steps, but the Trainer estimates {total} (a "
                         "training dataloader without a length?): set trainer.max_steps, or the scheduler's "
                         "total_steps")
    return int(total)


def parameter_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters; biases, norms and the temperature get no weight decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_config(module: L.LightningModule, optimizer_factory: OptimizerCallable,
                     scheduler_factory: LRSchedulerCallable | None, params: Any) -> Any:
    """``configure_optimizers``'s answer: the optimizer, and the scheduler stepped every step."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if isinstance(scheduler, CosineSchedule) and scheduler.total_steps is None:  # known only now
        scheduler.total_steps = total_training_steps(module.trainer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
