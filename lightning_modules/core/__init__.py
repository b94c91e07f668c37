"""The small core every retrieval family builds on: the base module's contract and shared step,
gallery evaluation, two-stage training, checkpoint loading, optimisation, declared interfaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .atomic_io import AtomicCheckpointIO
    from .checkpoints import load_init_checkpoint, load_weights, state_dict_of, submodule_weights
    from .contract import Products, TrainingPair
    from .evaluation import RetrievalEval, Split
    from .hparams import save_config_hyperparameters
    from .interfaces import DistributedLoss, Retriever, Tempered, TwoStage, Variants
    from .module import RetrievalModule
    from .optimisation import default_optimizer, optimizer_config, parameter_groups, total_training_steps
    from .schedules import CosineSchedule
    from .two_stage import TrainingStage

_EXPORTS = {
    "AtomicCheckpointIO": ".atomic_io",
    "CosineSchedule": ".schedules",
    "DistributedLoss": ".interfaces",
    "Products": ".contract",
    "RetrievalEval": ".evaluation",
    "RetrievalModule": ".module",
    "Retriever": ".interfaces",
    "Split": ".evaluation",
    "Tempered": ".interfaces",
    "TrainingPair": ".contract",
    "TrainingStage": ".two_stage",
    "TwoStage": ".interfaces",
    "Variants": ".interfaces",
    "default_optimizer": ".optimisation",
    "load_init_checkpoint": ".checkpoints",
    "load_weights": ".checkpoints",
    "optimizer_config": ".optimisation",
    "parameter_groups": ".optimisation",
    "save_config_hyperparameters": ".hparams",
    "state_dict_of": ".checkpoints",
    "submodule_weights": ".checkpoints",
    "total_training_steps": ".optimisation",
}
__all__ = ["AtomicCheckpointIO", "CosineSchedule", "DistributedLoss", "Products", "RetrievalEval", "RetrievalModule",
           "Retriever", "Split", "Tempered", "TrainingPair", "TrainingStage", "TwoStage", "Variants",
           "default_optimizer", "load_init_checkpoint", "load_weights", "optimizer_config", "parameter_groups",
           "save_config_hyperparameters", "state_dict_of", "submodule_weights", "total_training_steps"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
