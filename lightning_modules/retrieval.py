"""The base LightningModule of every CIR family: one shared step, gallery evaluation, Recall@K.

A family implements ``encode_query`` (source views + modification text → query embedding) and
``encode_target`` (product views → embedding). Everything else is here: the contrastive step used
by train/val/test, gallery and query encoding in evaluation (dataloader 0 is the gallery,
dataloader 1 the queries), Recall@K logging as ``val/recall_at_10`` and
``val/<dataset>/recall_at_10``, optimizer and scheduler from the config.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

# Private, but the only way to tell a LightningCLI instantiation (hparams = the config, ready for
# MLflow and load_from_checkpoint) from one by hand (hparams must not hold modules or callables).
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn

from datamodules.schema import stable_id

from .bank import TargetBank
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


def load_weights(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused, it holds pickled Python objects and checkpoints are loaded weights-only "
            f"(a file from an untrusted source could run code). Re-save it as plain tensors. ({exc})".replace("\n", " ")
        ) from exc


def total_training_steps(trainer: L.Trainer) -> int:
    """The run's optimizer steps, for schedules; a clear error when the Trainer cannot tell."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"the LR schedule needs the run's number of steps, but the Trainer estimates {total} (a "
                         "training dataloader without a length?): set trainer.max_steps, or the scheduler's "
                         "total_steps")
    return int(total)


def optimizer_config(module: L.LightningModule, optimizer_factory: OptimizerCallable,
                     scheduler_factory: LRSchedulerCallable | None, params: Any) -> Any:
    """``configure_optimizers``'s answer: the optimizer, and the scheduler stepped every step."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if getattr(scheduler, "total_steps", 0) is None:  # CosineSchedule: the run's length, known only now
        scheduler.total_steps = total_training_steps(module.trainer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
        stage2_loss: loss of stage 2 (e.g. ``StaticBankLoss``), against the static target bank.
        stage: 1 (coarse alignment, in-batch negatives) or 2 (target encoder frozen, bank + hard
            negatives). ``callbacks.StageSwitch`` moves a run from 1 to 2; start at 2 for a separate
            stage-2 run initialised from a stage-1 checkpoint.
        init_checkpoint: a checkpoint whose weights initialise the model (loaded weights-only).
        skip_bad_steps: skip (and count, ``train/skipped_steps``) a training step whose loss is NaN or
            infinite, instead of stopping with an error that names the step and the loss terms.
    """

    def __init__(self, loss: nn.Module, optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None,
                 stage2_loss: nn.Module | None = None, stage: Literal[1, 2] = 1,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False) -> None:
        super().__init__()
        self.loss = loss
        self.skip_bad_steps = skip_bad_steps
        self.skipped_steps = 0
        self.last_terms: dict[str, float] = {}
        self.stage2_loss = stage2_loss
        self.stage = stage
        self.init_checkpoint = init_checkpoint
        self.bank: TargetBank | None = None
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

    def encode_target(self, images: torch.Tensor, mask: torch.Tensor,
                      captions: list[str] | None = None) -> torch.Tensor:
        """Product views (and, for families that use them, product captions) → target embeddings."""
        raise NotImplementedError

    def embed_targets(self, batch: dict[str, Any], gallery: bool) -> torch.Tensor:
        """Target embeddings of a gallery batch (``gallery``) or of a triplet batch's targets."""
        if gallery:
            return self.encode_target(batch["images"], batch["mask"], batch.get("caption"))
        return self.encode_target(batch["target_images"], batch["target_mask"], batch.get("target_caption"))

    def training_loss(self, query: torch.Tensor, target: torch.Tensor,
                      batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms (``loss`` is the total); families with extra negatives override this."""
        return {"loss": self.loss(query, target, gather=True)}

    def image_transform(self) -> Any | None:
        """The preprocessing the backbone expects; handed to the DataModule in ``setup``."""
        return None

    def target_encoder(self) -> list[nn.Module]:
        """The modules that embed targets; frozen in stage 2."""
        return []

    def variant_switches(self) -> dict[str, bool | str]:
        """The mechanisms this run has on or off (MLflow tags ``variant.*``, columns of ``cir-compare``)."""
        return {"two_stage": self.stage2_loss is not None}

    # -- two-stage training ------------------------------------------------------------------------
    def enter_stage2(self) -> None:
        """Freeze the target encoder: no gradients, eval mode, and out of the optimizer (which
        ``parameter_groups`` builds from trainable parameters only)."""
        if self.stage2_loss is None:
            raise ValueError("stage 2 needs model.init_args.stage2_loss (e.g. lightning_modules.StaticBankLoss)")
        self.stage = 2
        for module in self.target_encoder():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> RetrievalModule:
        super().train(mode)
        if self.stage == 2:  # Lightning switches everything back to train mode after validation
            for module in self.target_encoder():
                module.eval()
        return self

    @torch.no_grad()
    def build_bank(self, gallery_batches: Any, hard_negatives: int = 8) -> TargetBank:
        """Embed every product of ``gallery_batches`` with the (frozen) target encoder."""
        was_training = self.training
        self.eval()
        encoded = ((self.embed_targets(self.transfer_batch_to_device(b, self.device, 0), gallery=True), b["meta"])
                   for b in gallery_batches)
        self.bank = TargetBank.from_batches(encoded, hard_negatives=hard_negatives).to(self.device)
        self.train(was_training)
        return self.bank

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cir_stage"] = self.stage
        # So `--ckpt_path last` after a crash logs into the same MLflow run (see cli.CIRCLI).
        run_ids = [lg.run_id for lg in self.loggers if type(lg).__name__.endswith(("MLFlowLogger", "MLflowLogger"))]
        if run_ids:
            checkpoint["mlflow_run_id"] = run_ids[0]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("cir_stage") == 2 and self.stage != 2:
            self.enter_stage2()

    def _load_init_checkpoint(self) -> None:
        path = Path(self.init_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.init_args.init_checkpoint={self.init_checkpoint} does not exist. It is written by the "
                "stage-1 run: `lightning fit --config experiments/clip4cir_stage1.yaml` (see the experiment "
                "file that names this checkpoint)."
            )
        state = load_weights(path)
        missing, unexpected = self.load_state_dict(state.get("state_dict", state), strict=False)
        real_missing = [k for k in missing if not k.startswith("recall.")]
        if real_missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {real_missing[:5]}, unexpected "
                             f"{unexpected[:5]}; was it written by the same model family and backbone?")
        self.init_checkpoint = None  # once: a resumed run restores from its own checkpoint
    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.init_checkpoint:
            self._load_init_checkpoint()
        if self.stage == 2:  # before DDP wraps the model, so frozen parameters are never registered
            self.enter_stage2()
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
        """Query embeddings and, when the batch has target images, the loss.

        Stage 1 and every evaluation: in-batch contrastive loss. Stage-2 training: the static-bank
        loss (the target encoder is frozen, so targets are embedded without gradients)."""
        query = self.encode_query(batch)
        loss = None
        # Multi-vector (MaxSim) queries have no in-batch contrastive loss; only Recall@K scores them.
        if "target_images" in batch and query.ndim == 2:
            n = query.shape[0]
            if stage == "train" and self.stage == 2 and self.bank is not None:
                with torch.no_grad():
                    target = self.embed_targets(batch, gallery=False)
                terms = self.stage2_loss(query, target, self.bank, batch["target_id"])
            elif stage == "train":
                terms = self.training_loss(query, self.embed_targets(batch, gallery=False), batch)
            else:  # evaluation: the plain in-batch loss, comparable across stages and families
                terms = {"loss": self.loss(query, self.embed_targets(batch, gallery=False), gather=False)}
            loss = terms.pop("loss")
            self.last_terms = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
            for name, value in terms.items():
                self.log(f"{stage}/{name}_loss", value, batch_size=n, add_dataloader_idx=False,
                         sync_dist=stage != "train")
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=n, sync_dist=stage != "train",
                     add_dataloader_idx=False)
        return query, loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        _, loss = self.model_step(batch, "train")
        if not torch.isfinite(loss):
            where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            if not self.skip_bad_steps:
                raise FloatingPointError(
                    f"non-finite training loss at {where}; loss terms: {self.last_terms}. Lower the learning rate "
                    "or check the inputs of this batch; model.init_args.skip_bad_steps=true skips such steps.")
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=len(batch["text"]))
            return None  # Lightning skips backward and the optimizer step
        if hasattr(self.loss, "temperature"):
            self.log("train/temperature", self.loss.temperature, batch_size=len(batch["text"]))
        self.log("train/stage", float(self.stage), batch_size=len(batch["text"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        metric = self.recall[stage]
        datasets = self._dataset_index(batch["dataset"])
        if "images" in batch:  # gallery product
            emb = self.embed_targets(batch, gallery=True)
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
                    "embedding": self.embed_targets(batch, gallery=True).cpu()}
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
        return optimizer_config(self, self.optimizer_factory, self.scheduler_factory, self.parameter_groups())
