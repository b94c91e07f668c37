"""The base LightningModule of every CIR family: one shared step, gallery evaluation, Recall@K.

A family implements ``encode_query`` (source views + modification text → query embedding) and
``encode_target`` (product views → embedding). Everything else is here: the contrastive step used
by train/val/test, gallery and query encoding in evaluation (dataloader 0 is the gallery,
dataloader 1 the queries), Recall@K logging as ``val/recall_at_10`` and
``val/<dataset>/recall_at_10``, optimizer and scheduler from the config.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

# Private, but the only way to tell a LightningCLI instantiation (hparams = the config, ready for
# MLflow and load_from_checkpoint) from one by hand (hparams must not hold modules or callables).
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn

from .metrics import RecallAtK, stable_id
from .search import Backend


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def save_config_hyperparameters(module: L.LightningModule, object_args: Sequence[str]) -> None:
    """Save the caller's init args as hparams, the config form of ``object_args`` under LightningCLI."""
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    ignore = None if _given_hyperparameters.get() is not None else list(object_args)
    module.save_hyperparameters(ignore=ignore, frame=caller)


class RetrievalModule(L.LightningModule):
    """Shared training and evaluation logic for composed image retrieval.

    Args:
        loss: contrastive loss taking (query, target) embeddings, e.g. ``SymmetricInfoNCE``.
        optimizer: optimizer factory, called with parameter groups (biases, norms and the
            temperature get no weight decay).
        scheduler: optional LR scheduler factory; stepped every optimizer step.
        top_k: the K values of Recall@K.
        search_backend: ``torch`` or ``faiss`` for the evaluation search.
    """

    def __init__(self, loss: nn.Module, optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, top_k: tuple[int, ...] = (1, 5, 10),
                 search_backend: Backend = "torch") -> None:
        super().__init__()
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.top_k = tuple(top_k)
        self.search_backend = search_backend
        self.dataset_names: list[str] = []
        self.recall = nn.ModuleDict({split: RecallAtK(top_k=self.top_k, backend=search_backend)
                                     for split in ("val", "test")})

    # -- to implement ----------------------------------------------------------------------------
    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def encode_target(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_transform(self) -> Any | None:
        """The preprocessing the backbone expects; handed to the DataModule in ``setup``."""
        return None

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if hasattr(self.loss, "rank"):
            self.loss.rank, self.loss.world_size = self.global_rank, self.trainer.world_size
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            transform = self.image_transform()
            if transform is not None and hasattr(dm, "set_image_transform"):
                dm.set_image_transform(transform)
            if hasattr(dm, "datasets"):
                self.dataset_names = list(dm.datasets)

    def _dataset_index(self, names: list[str]) -> torch.Tensor:
        for n in names:
            if n not in self.dataset_names:
                self.dataset_names.append(n)
        return torch.tensor([self.dataset_names.index(n) for n in names], device=self.device)

    # -- steps -----------------------------------------------------------------------------------
    def model_step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query embeddings and, when the batch has target images, the contrastive loss."""
        query = self.encode_query(batch)
        loss = None
        if "target_images" in batch:
            target = self.encode_target(batch["target_images"], batch["target_mask"])
            loss = self.loss(query, target, gather=stage == "train")
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=query.shape[0],
                     sync_dist=stage != "train", add_dataloader_idx=False)
        return query, loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self.model_step(batch, "train")
        if hasattr(self.loss, "temperature"):
            self.log("train/temperature", self.loss.temperature, batch_size=len(batch["text"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        metric = self.recall[stage]
        if "images" in batch:  # gallery product
            emb = self.encode_target(batch["images"], batch["mask"])
            ids = batch["product_id"]
        else:
            emb, _ = self.model_step(batch, stage)
            ids = batch["target_id"]
        ids_t = torch.tensor([stable_id(i) for i in ids], device=self.device)
        metric.update(emb, ids_t, self._dataset_index(batch["dataset"]), gallery="images" in batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if "images" in batch:
            return {"product_id": batch["product_id"], "dataset": batch["dataset"],
                    "embedding": self.encode_target(batch["images"], batch["mask"]).cpu()}
        return {"source_id": batch["source_id"], "target_id": batch["target_id"], "dataset": batch["dataset"],
                "embedding": self.encode_query(batch).cpu()}

    def _log_recall(self, stage: str) -> None:
        metric = self.recall[stage]
        if not metric.update_called:
            return
        metric.dataset_names = self.dataset_names
        for name, value in metric.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "recall_at_10", sync_dist=False,
                     add_dataloader_idx=False, rank_zero_only=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_recall("val")

    def on_test_epoch_end(self) -> None:
        self._log_recall("test")

    # -- optimisation ----------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
