"""Tags every MLflow run with what it is, so runs can be filtered and compared (``cir compare``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger

from datamodules.interfaces import RetrievalData
from lightning_modules.core.interfaces import Variants

from .eval_artifacts import config_hash


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


class RunTags(Callback):
    """Sets ``family``, ``variant`` (and one ``variant.<switch>`` tag per switch), ``dataset``,
    ``git_commit`` and ``config_hash`` on the MLflow run, once, at the start of fit/validate/test."""

    def __init__(self) -> None:
        self.done = False

    def _tag(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.done or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        switches = pl_module.variant_switches() if isinstance(pl_module, Variants) else {}
        dm = trainer.datamodule
        tags = {
            "family": type(pl_module).__name__,
            "variant": ",".join(f"{k}={v}" for k, v in switches.items()) or "default",
            "dataset": ",".join(dm.datasets) if isinstance(dm, RetrievalData) else "",
            "git_commit": git_commit(),
            "config_hash": config_hash(pl_module, trainer),
            **{f"variant.{k}": str(v) for k, v in switches.items()},
        }
        for logger in loggers:
            for k, v in tags.items():
                logger.experiment.set_tag(logger.run_id, k, v)
        self.done = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)
