"""MLflow as the tracking backend: a logger with the project's default store, and config artifacts.

MLflow 3 refuses the old ``./mlruns`` file store, which is what Lightning's ``MLFlowLogger`` falls
back to without a URI (and its default is read from the environment at *import* time). This
logger resolves the URI when it is built: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db``
in the working directory.

LightningCLI's ``SaveConfigCallback`` writes ``config.yaml`` into ``trainer.log_dir``, which for an
MLflow store is not a run folder; ``LogConfigToMLflow`` logs the resolved config as an artifact of
the run instead (and to ``log_dir`` only when no MLflow logger is configured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from .tracking import resolve_tracking_uri


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` whose tracking URI defaults to ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.

    Args:
        experiment_name: MLflow experiment the run goes to.
        run_name: name shown in the MLflow UI.
        tracking_uri: explicit store; None means the environment or the project default.
        tags: run tags.
        log_model: log checkpoints as artifacts (see ``MLFlowLogger``).
    """

    def __init__(self, experiment_name: str = "fashion-cir", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: dict[str, Any] | None = None,
                 log_model: bool = False, run_id: str | None = None) -> None:
        super().__init__(experiment_name=experiment_name, run_name=run_name,
                         tracking_uri=resolve_tracking_uri(tracking_uri), tags=tags, log_model=log_model,
                         run_id=run_id)

    def log_hyperparams(self, params: Any) -> None:
        # LightningCLI stores how it built the module under ``_instantiator``: not a hyperparameter.
        if isinstance(params, dict):
            params = {k: v for k, v in params.items() if not str(k).startswith("_")}
        super().log_hyperparams(params)


# MLflow 3 opens an experiment without this tag in its GenAI view (traces); this kind opens the runs table.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class LogConfigToMLflow(SaveConfigCallback):
    """Saves the resolved LightningCLI config as ``config.yaml`` in every MLflow run of the trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        for logger in mlflow_loggers:
            logger.experiment.log_text(logger.run_id, text, self.config_filename)
        if not mlflow_loggers:
            # Not trainer.log_dir: it broadcasts, and this method runs on rank 0 alone (a DDP deadlock).
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
