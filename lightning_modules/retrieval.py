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
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

# Private, but the only way to tell a LightningCLI instantiation (hparams = the config, ready for
# MLflow and load_from_checkpoint) from one by hand (hparams must not hold modules or callables).
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn

from datamodules.schema import stable_id

from .metrics import GalleryProtocol, RecallAtK
from .search import Backend


@dataclass
class RetrievalEval:
    """How validation and test score retrieval (see ``RecallAtK``).

    Args:
        top_k: the K of Recall@K.
        score_k: K values whose dataset-averaged recalls are averaged into ``val/score``.
        gallery_protocol: ``all`` products of the query's dataset, or only those some query uses.
        remove_source: exclude each query's source product from its ranking.
        backend: ``torch`` chunked exact search or a ``faiss`` flat index.
        examples: queries drawn in the retrieval picture logged after evaluation (0: none).
    """

    top_k: tuple[int, ...] = (1, 5, 10)
    score_k: tuple[int, ...] | None = None
    gallery_protocol: GalleryProtocol = "all"
    remove_source: bool = False
    backend: Backend = "torch"
    examples: int = 4

    def __post_init__(self) -> None:
        problems = []
        if not self.top_k or any(k < 1 for k in self.top_k):
            problems.append(f"top_k={list(self.top_k)}: give one or more K >= 1")
        if self.score_k and not set(self.score_k) <= set(self.top_k):
            problems.append(f"score_k={list(self.score_k)}: every K must also be in top_k={list(self.top_k)}")
        if self.examples < 0:
            problems.append(f"examples={self.examples}: must be >= 0")
        if problems:
            raise ValueError("model.init_args.evaluation: " + "; ".join(problems))

    def metric(self) -> RecallAtK:
        return RecallAtK(top_k=self.top_k, score_k=self.score_k, gallery_protocol=self.gallery_protocol,
                         remove_source=self.remove_source, backend=self.backend)


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
        evaluation: the retrieval protocol of validation and test.
    """

    def __init__(self, loss: nn.Module, optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.evaluation = evaluation or RetrievalEval()
        self.dataset_names: list[str] = []
        self.recall = nn.ModuleDict({split: self.evaluation.metric() for split in ("val", "test")})
        # The last evaluated gallery, kept for callbacks (retrieval pictures, indexes) until read.
        self.last_gallery: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
        datasets = self._dataset_index(batch["dataset"])
        if "images" in batch:  # gallery product
            emb = self.encode_target(batch["images"], batch["mask"])
            metric.update(emb, self._ids(batch["product_id"]), datasets, gallery=True)
        else:
            emb, _ = self.model_step(batch, stage)
            metric.update(emb, self._ids(batch["target_id"]), datasets, gallery=False,
                          source_ids=self._ids(batch["source_id"]))

    def _ids(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([stable_id(i) for i in ids], dtype=torch.long, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Embeddings with their ids; the dataset's own ids (``raw_id``) for submission files."""
        if "images" in batch:
            return {"product_id": batch["product_id"], "dataset": batch["dataset"],
                    "raw_id": [m.get("raw_id") or m["product_id"] for m in batch["meta"]],
                    "embedding": self.encode_target(batch["images"], batch["mask"]).cpu()}
        targets = [m["target"] for m in batch["meta"]]
        return {"source_id": batch["source_id"], "target_id": batch["target_id"], "dataset": batch["dataset"],
                "text": batch["text"],
                "raw_id": [m["source"].get("raw_id") or m["source"]["product_id"] for m in batch["meta"]],
                "target_raw_id": [(t.get("raw_id") or t["product_id"]) if t else None for t in targets],
                "embedding": self.encode_query(batch).cpu()}

    def _log_recall(self, stage: str) -> None:
        metric = self.recall[stage]
        if not metric.update_called:
            return
        metric.dataset_names = self.dataset_names
        for name, value in metric.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "recall_at_10", sync_dist=False,
                     add_dataloader_idx=False, rank_zero_only=False)
        self.last_gallery = metric.gallery()
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
