"""The base LightningModule of every CIR family: the encoder contract and one shared step.

A family implements the contract, ``encode_query(batch)`` (source views + modification text →
query embedding) and ``encode_target(products)`` (product views → embedding), and may extend the
declared hooks below; it overrides nothing else. Evaluation (``core.evaluation``), two-stage
training (``core.two_stage``), checkpoints and optimisation live beside this file.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.interfaces import Preprocessed, RetrievalData

from ..components.bank import TargetBank
from ..components.false_negatives import batch_keys, id_kwargs, negative_keys
from ..components.mined_negatives import MinedNegativesLoss
from .adapters import LoraSettings, apply_lora
from .checkpoints import load_init_checkpoint, mlflow_run_id
from .contract import Products, TrainingPair
from .embedding import embed_product_batch, embed_query_batch
from .evaluation import GalleryEvaluation, RetrievalEval, Split
from .grad_cache import Terms, batch_size, grad_cache_step
from .interfaces import DistributedLoss, MasksFalseNegatives, Tempered
from .optimisation import default_optimizer, optimizer_config, parameter_groups
from .sharding import configure_sharding
from .two_stage import TrainingStage, TwoStageTraining

STAGE1_COMMAND = "lightning fit --config experiments/clip4cir/stage1.yaml"


class RetrievalModule(GalleryEvaluation, TwoStageTraining, L.LightningModule):
    """Shared training and evaluation logic for composed image retrieval.

    Args:
        loss: contrastive loss taking (query, target) embeddings, ``gather`` and ``ids`` (the product
            keys of the positives, for false-negative masking), e.g. ``SymmetricInfoNCE``.
        optimizer: optimizer factory, called with parameter groups (biases, norms and the
            temperature get no weight decay).
        scheduler: optional LR scheduler factory; stepped every optimizer step.
        evaluation: the retrieval protocol of validation and test.
        stage2_loss: loss of stage 2 (e.g. ``StaticBankLoss``), against the static target bank.
        training_stage: 1 (coarse alignment, in-batch negatives) or 2 (target encoder frozen, bank +
            hard negatives). ``callbacks.StageSwitch`` moves a run from 1 to 2; start at 2 for a
            separate stage-2 run initialised from a stage-1 checkpoint.
        init_checkpoint: a checkpoint whose weights initialise the model (loaded weights-only).
        skip_bad_steps: skip (and count, ``train/skipped_steps``) a training step whose loss is NaN or
            infinite, instead of stopping with an error that names the step and the loss terms.
        grad_cache_chunk: GradCache (``core.grad_cache``): embed each training batch in chunks of this
            many samples, so the contrastive batch (its negatives) can be far larger than what fits
            in memory at once; the same loss and gradients as the plain batch. None: off.
        lora: LoRA adapters on the backbone(s) instead of training them in full (``core.adapters``);
            None: off.
        mined_negatives: the loss term of offline-mined hard negatives (``cir mine-negatives``, loaded
            by ``data.init_args.hard_negatives``): each query against its target and its mined
            products, added to the stage-1 loss. None: mined negatives in a batch are not used.
    """

    def __init__(self, loss: nn.Module, optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None,
                 stage2_loss: nn.Module | None = None, training_stage: TrainingStage = 1,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False,
                 grad_cache_chunk: int | None = None, lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__()
        self.lora = lora
        self.mined_negatives = mined_negatives
        if grad_cache_chunk is not None and grad_cache_chunk < 1:
            raise ValueError(f"model.init_args.grad_cache_chunk={grad_cache_chunk}: give a chunk size >= 1, or null "
                             "to train on whole batches")
        self.grad_cache_chunk = grad_cache_chunk
        # GradCache: the gradients of every chunk but the last, until Lightning's backward of the step.
        self.chunk_grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.loss = loss
        self.skip_bad_steps = skip_bad_steps
        self.skipped_steps = 0
        self.last_terms: dict[str, float] = {}
        self.stage2_loss = stage2_loss
        self.training_stage = training_stage
        self.init_checkpoint = init_checkpoint
        self.bank: TargetBank | None = None
        self._masking: list[MasksFalseNegatives] | None = None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._init_evaluation(evaluation)

    # Families with per-step random choices set this from their ``seed`` (see ``sample_rng``).
    random_seed: int = 0
    draw_key: tuple[int, int] = (0, 0)

    # -- the contract ------------------------------------------------------------------------------
    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        """Source views + modification text of a triplet batch → query embeddings ``[B, D]`` (or
        ``[B, V, D]`` multi-vectors for MaxSim evaluation)."""
        raise NotImplementedError

    def encode_target(self, products: Products) -> torch.Tensor:
        """Products → target embeddings, the same shape as the queries'."""
        raise NotImplementedError

    # -- hooks a family may extend -----------------------------------------------------------------
    def embed_pair(self, batch: dict[str, Any]) -> TrainingPair:
        """A stage-1 training forward: the query, then the target."""
        query = self.encode_query(batch)
        return TrainingPair(query, self.encode_target(Products.targets_of(batch)))

    def training_terms(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms (``loss`` is the total). Everything an encoder computes belongs in
        ``embed_pair`` (per sample, in ``pair.extras``): GradCache runs the encoders chunk by chunk
        and this method once, on the whole batch's embeddings. Every contrastive term gets the
        product keys of its positives (``batch_keys``), so that a copy of a row's positive is never
        one of its negatives."""
        return {"loss": self.loss(pair.query, pair.target, gather=True,
                                  **id_kwargs(self.loss, batch_keys(batch, device=self.device)))}

    def embed_with_mined(self, batch: dict[str, Any]) -> TrainingPair:
        """The family's training forward plus the target embeddings of the batch's mined negatives
        (``negative_images``: ``[B, K, V, ...]`` with ``negative_mask`` ``[B, K, V]``, or per-sample
        lists of K products' views), ``[B, K, D]`` with ``mined_valid`` ``[B, K]``."""
        pair = self.embed_pair(batch)
        if "negative_images" not in batch:
            raise ValueError("model.init_args.mined_negatives is set but the batches carry no mined negatives: set "
                             "data.init_args.hard_negatives (and run `cir mine-negatives` first)")
        images, mask = batch["negative_images"], batch.get("negative_mask")
        if isinstance(images, torch.Tensor):
            b, k = images.shape[:2]
            valid = mask.any(-1)
            flat = Products(images[valid], mask[valid])
        else:
            b, k = len(images), max((len(p) for p in images), default=0)
            valid = torch.tensor([[j < len(p) and len(p[j]) > 0 for j in range(k)] for p in images],
                                 dtype=torch.bool).view(b, k)
            flat = Products([views for p in images for views in p if views])
        valid = valid.to(pair.target.device)
        out = pair.target.new_zeros(b, k, *pair.target.shape[1:])
        if len(flat):
            out[valid] = self.encode_target(flat).to(out.dtype)
        pair.extras.update(mined=out, mined_valid=valid)
        return pair

    def terms_with_mined(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = self.training_terms(pair, batch)
        valid = pair.extras["mined_valid"]
        terms["mined"] = self.mined_negatives(pair.query, pair.target, pair.extras["mined"], valid,
                                              ids=batch_keys(batch, device=valid.device),
                                              negative_ids=negative_keys(batch, valid.shape[1], valid.device))
        terms["loss"] = terms["loss"] + self.mined_negatives.weight * terms["mined"]
        return terms

    def sample_rng(self, *key: object) -> random.Random:
        """The generator of one random choice of the current training batch (which words of a caption
        the CoT keeps, which caption a step aligns to), keyed by what it is for and by the rank,
        epoch and batch. A choice then depends on nothing else: not on the chunk GradCache embeds
        it in, nor on how many draws came before, so a resumed run draws what the uninterrupted one
        drew."""
        seeds = (os.environ.get("PL_GLOBAL_SEED", ""), self.random_seed, self.global_rank, *self.draw_key)
        return random.Random("|".join(map(str, (*seeds, *key))))

    def image_transform(self) -> Any | None:
        """The preprocessing the backbone expects; handed to the DataModule in ``setup``."""
        return None

    def variant_switches(self) -> dict[str, bool | str]:
        """The mechanisms this run has on or off (MLflow tags ``variant.*``, columns of ``cir compare``)."""
        return {"two_stage": self.stage2_loss is not None}

    def init_command(self) -> str:
        """The run that writes this family's ``init_checkpoint``, named when the file is missing."""
        return STAGE1_COMMAND

    # Families with a backbone or several view strategies set these in ``__init__``.
    backbone_name: str = ""
    view_strategy: str = "single"

    def describe(self) -> dict[str, str]:
        """What a comparison table shows of this model (``core.interfaces.Described``)."""
        name = type(self).__name__ + (f" ({self.backbone_name})" if self.backbone_name else "")
        return {"model": name, "parameters": str(sum(p.numel() for p in self.parameters())),
                "strategy": self.view_strategy}

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.lora is not None:  # first: an init checkpoint written with LoRA has the adapters' keys
            apply_lora(self, self.lora)
        if self.init_checkpoint:
            load_init_checkpoint(self, self.init_checkpoint, self.init_command(), "model.init_args.init_checkpoint")
            self.init_checkpoint = None  # once: a resumed run restores from its own checkpoint
        if self.grad_cache_chunk and str(self.trainer.precision).startswith("16"):
            raise ValueError(f"model.init_args.grad_cache_chunk with trainer.precision={self.trainer.precision}: the "
                             "chunks' backward passes run outside the fp16 loss scaler; use bf16-mixed or 32-true")
        if self.training_stage == 2:  # before DDP wraps the model, so frozen parameters are never registered
            self.enter_stage2()
        self.connect_ranks(self.global_rank, self.trainer.world_size)
        dm = self.trainer.datamodule
        if isinstance(dm, Preprocessed):  # RetrievalData, and the exporter's CatalogueDataModule
            transform = self.image_transform()
            if transform is not None:
                dm.set_image_transform(transform)
        if isinstance(dm, RetrievalData):
            self.dataset_names = list(dm.datasets)

    def configure_model(self) -> None:
        # FSDP2 (configs/trainer/fsdp.yaml): shard after setup() applied LoRA, before the optimizer exists.
        configure_sharding(self, self.trainer.strategy)

    def connect_ranks(self, rank: int, world_size: int) -> None:
        """Hand rank and world size to every loss that talks to other ranks (``DistributedLoss``)."""
        for module in self.modules():
            if isinstance(module, DistributedLoss):
                module.set_distributed(rank, world_size)

    def masking_losses(self) -> list[MasksFalseNegatives]:
        """The losses that count the false negatives they mask (found once: the scan of a billion-
        parameter model's modules would otherwise cost every step)."""
        if self._masking is None:
            self._masking = [m for m in self.modules() if isinstance(m, MasksFalseNegatives)]
        return self._masking

    def log_masked_negatives(self, split: Split, n: int) -> None:
        """``train/masked_negatives``: the share of this step's negative entries, over every term,
        masked as the same product as the row's positive. Read (and reset) in every split, logged in
        training only."""
        counts = [c for m in self.masking_losses() if (c := m.pop_masked_negatives()) is not None]
        if counts and split == "train":
            masked = sum(c[0] for c in counts).float()
            total = sum(c[1] for c in counts)
            self.log("train/masked_negatives", masked / total.clamp(min=1), batch_size=n)

    def train(self, mode: bool = True) -> RetrievalModule:
        super().train(mode)
        self.keep_frozen_in_eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cir_training_stage"] = self.training_stage
        run_id = mlflow_run_id(self.loggers)  # so `--ckpt_path last` after a crash logs into the same run
        if run_id:
            checkpoint["mlflow_run_id"] = run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stage = checkpoint.get("cir_training_stage", checkpoint.get("cir_stage"))
        if stage == 2 and self.training_stage != 2:
            self.enter_stage2()

    # -- the shared step ---------------------------------------------------------------------------
    def training_forward(self, batch: dict[str, Any]) -> tuple[TrainingPair, Terms]:
        """The training embeddings and loss terms: stage 1 (in-batch) or stage 2 (against the bank),
        on the whole batch or, with ``grad_cache_chunk``, chunk by chunk (the chunks' gradients are
        then already accumulated, and ``loss`` carries the rest)."""
        if self.training_stage == 2 and self.bank is not None:
            embed, terms_of = self.stage2_pair, self.stage2_loss_terms
        elif self.mined_negatives is not None:
            embed, terms_of = self.embed_with_mined, self.terms_with_mined
        else:
            embed, terms_of = self.embed_pair, self.training_terms
        chunk = self.grad_cache_chunk
        if not chunk or batch_size(batch) <= chunk:
            pair = embed(batch)
            return pair, terms_of(pair, batch)
        trainer = self._trainer
        scale = 1.0 / trainer.accumulate_grad_batches if trainer is not None else 1.0
        # Lightning zeroes gradients between the training step and its backward, so the chunks'
        # gradients are kept aside here and added back in ``on_before_backward``.
        params = [p for p in self.parameters() if p.requires_grad]
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        step = grad_cache_step(batch, chunk, embed, terms_of, backward_scale=scale)
        self.chunk_grads = [(p, p.grad) for p in params if p.grad is not None]
        for p, grad in zip(params, earlier, strict=True):
            p.grad = grad
        return step.pair, step.terms

    def on_before_backward(self, loss: torch.Tensor) -> None:
        for p, grad in self.chunk_grads:
            p.grad = grad if p.grad is None else p.grad + grad
        self.chunk_grads = []

    def model_step(self, batch: dict[str, Any], split: Split) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query embeddings and, when the batch has targets, the loss: in-batch (stage 1 and, with
        ``evaluation.loss``, every evaluation, comparable across stages and families) or against the
        bank (stage-2 training)."""
        if split == "train":
            pair, terms = self.training_forward(batch)
            query = pair.query
        else:
            query = self.encode_query(batch)
            # The loss embeds every query's target a second time (Recall@K needs only the gallery's),
            # so it is computed only when asked. Multi-vector (MaxSim) queries have no in-batch
            # contrastive loss; only Recall@K scores them.
            if not self.evaluation.loss or "target_images" not in batch or query.ndim != 2:
                return query, None
            target = self.encode_target(Products.targets_of(batch))
            terms = {"loss": self.loss(query, target, gather=False,
                                       **id_kwargs(self.loss, batch_keys(batch, device=self.device)))}
        n = query.shape[0]
        self.log_masked_negatives(split, n)
        loss = terms.pop("loss")
        self.last_terms = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        for name, value in terms.items():
            self.log(f"{split}/{name}_loss", value, batch_size=n, add_dataloader_idx=False, sync_dist=split != "train")
        self.log(f"{split}/loss", loss, prog_bar=split == "train", batch_size=n, sync_dist=split != "train",
                 add_dataloader_idx=False)
        return query, loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.draw_key = (self.current_epoch, batch_idx)
        # Dropout and any other draw from torch's generators depend on the batch's position alone,
        # as the model-side choices do (``sample_rng``): a resumed run draws what the uninterrupted
        # one drew, with no generator state to carry in the checkpoint.
        torch.manual_seed(self.sample_rng("torch").getrandbits(63))
        _, loss = self.model_step(batch, "train")
        n = len(batch["text"])
        if not torch.isfinite(loss):
            where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            if not self.skip_bad_steps:
                raise FloatingPointError(
                    f"non-finite training loss at {where}; loss terms: {self.last_terms}. Lower the learning rate "
                    "or check the inputs of this batch; model.init_args.skip_bad_steps=true skips such steps.")
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=n)
            return None  # Lightning skips backward and the optimizer step
        if isinstance(self.loss, Tempered):
            self.log("train/temperature", self.loss.temperature, batch_size=n)
        self.log("train/stage", float(self.training_stage), batch_size=n)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Embeddings with their ids; the dataset's own ids (``raw_id``) for submission files."""
        if "images" not in batch and not batch.get("text"):  # an exporter's batch of a part with nothing readable
            return {"product_id": [], "dataset": [], "raw_id": [], "embedding": None}
        if "images" in batch:
            return {"product_id": batch["product_id"], "dataset": batch["dataset"],
                    "raw_id": [m.get("raw_id") or m["product_id"] for m in batch["meta"]],
                    "embedding": embed_product_batch(self, batch).cpu()}
        targets = [m["target"] for m in batch["meta"]]
        return {"source_id": batch["source_id"], "target_id": batch["target_id"], "dataset": batch["dataset"],
                "text": batch["text"],
                "raw_id": [m["source"].get("raw_id") or m["source"]["product_id"] for m in batch["meta"]],
                "target_raw_id": [(t.get("raw_id") or t["product_id"]) if t else None for t in targets],
                "embedding": embed_query_batch(self, batch).cpu()}

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return optimizer_config(self, self.optimizer_factory, self.scheduler_factory, parameter_groups(self))
