"""Hyperparameters that are the config itself, whether the module came from LightningCLI or not."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import lightning as L

# Private, but the only way to tell a LightningCLI instantiation (hparams = the config, ready for
# MLflow and load_from_checkpoint) from one by hand (hparams must not hold modules or callables).
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


def save_config_hyperparameters(module: L.LightningModule, object_args: Sequence[str]) -> None:
    """Save the caller's init args as hparams, the config form of ``object_args`` under LightningCLI."""
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    ignore = None if _given_hyperparameters.get() is not None else list(object_args)
    module.save_hyperparameters(ignore=ignore, frame=caller)
