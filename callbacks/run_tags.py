"""Tags every MLflow run with what it is, so runs can be filtered and compared (``cir compare``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Dataset, DatasetInput, InputTag

from datamodules.interfaces import RetrievalData
from lightning_modules.core.interfaces import Described, Variants

from .eval_artifacts import config_hash
from .mlflow_logging import EXPERIMENT_KIND_TAG, MODEL_TRAINING


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


def dataset_input(data: RetrievalData, context: str) -> DatasetInput:
    """The shard folder as an MLflow dataset input: its name, a digest of its manifest (which lists
    every shard and count), and its path, so the runs table says what a run used."""
    manifest = Path(data.data_dir) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else "unknown"
    name = Path(data.data_dir).resolve().name or str(data.data_dir)
    source = json.dumps({"uri": str(Path(data.data_dir).resolve()), "datasets": data.datasets})
    return DatasetInput(Dataset(name=name, digest=digest, source_type="local", source=source),
                        tags=[InputTag("mlflow.data.context", context)])


class RunTags(Callback):
    """Sets ``family``, ``variant`` (and one ``variant.<switch>`` tag per switch), ``dataset``,
    ``stage`` (fit, validate, test), ``git_commit``, ``config_hash`` and, for a ``Described`` model,
    ``model``, ``parameters`` and ``strategy`` on the MLflow run, once, at the
    start of fit/validate/test; logs the shard folder as the run's dataset input and marks the
    experiment as model training (so MLflow's UI opens it on the runs table)."""

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
            "stage": trainer.state.fn.value if trainer.state.fn else "",
            "git_commit": git_commit(),
            "config_hash": config_hash(pl_module, trainer),
            **{f"variant.{k}": str(v) for k, v in switches.items()},
            **(pl_module.describe() if isinstance(pl_module, Described) else {}),
        }
        context = "train" if trainer.state.fn == "fit" else "eval"
        for logger in loggers:
            client = logger.experiment
            for k, v in tags.items():
                client.set_tag(logger.run_id, k, v)
            experiment = client.get_experiment(logger.experiment_id)
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                client.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            if isinstance(dm, RetrievalData):
                client.log_inputs(logger.run_id, datasets=[dataset_input(dm, context)])
        self.done = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag(trainer, pl_module)
