"""SPRC ("Sentence-level Prompts Benefit Composed Image Retrieval", Bai et al., ICLR 2024) on BLIP-2.

Query: the reference image's ViT patches are the memory the Q-Former's query tokens cross-attend to
while they attend jointly with the relative caption; the query part of that output is the
sentence-level prompt. The prompt, followed by the caption, goes through the Q-Former again without
the image; the feature at the caption's first token, projected and L2-normalised, is the query.
Target: the query tokens alone cross-attending to the target image, one projected, normalised
vector per token; a query scores a target by its best token.

Multi-view products. Training puts the patches of every view side by side in one memory (a
single-view product is exactly the single-image model): BLIP-2's cross-attention takes a memory of
any length, each patch keeps its own position embedding, and no view is dropped (a change may show
only on the back). Averaging the views' patch embeddings instead would blend unrelated patches.
Evaluation follows ``view_strategy``: ``joint`` (as trained), or the FashionMV paper's single-image
baselines ``meanpool`` and ``maxsim`` (one query per source view, one token set per target view).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.schema import MAX_VIEWS

from ...backbones.blip2 import Blip2Backbone, TextBranch
from ...backbones.clip import HFImageTransform
from ...components.bank import TargetBank
from ...components.false_negatives import batch_keys
from ...components.mined_negatives import MinedNegativesLoss
from ...components.multiview import per_view_embeddings
from ...core import (
    Products,
    RetrievalEval,
    RetrievalModule,
    TrainingPair,
    TrainingStage,
    default_optimizer,
    save_config_hyperparameters,
)
from ...core.adapters import LoraSettings
from .losses import SPRCLoss

ViewStrategy = Literal["joint", "meanpool", "maxsim"]


class SPRC(RetrievalModule):
    """SPRC: sentence-level prompts from BLIP-2's Q-Former, fused with the relative caption.

    Args:
        backbone: BLIP-2 (ViT, Q-Former, projections).
        loss: ``SPRCLoss`` (itc + weighted rtc and align; learnable temperature).
        freeze_vision: keep the ViT frozen, as SPRC does (its patch embeddings still feed the Q-Former).
        view_strategy: how evaluation embeds multi-view products: ``joint`` (every view in one memory,
            as trained), ``meanpool`` (the normalised mean of per-source-view queries; each target token
            the normalised mean of that token over the target's views) or ``maxsim`` (the best pair of
            source-view query and target-view token). Evaluation outputs are multi-vector, so that
            ``retrieval.search.maxsim`` computes exactly these scores: queries ``[B, 1, D]`` (``maxsim``:
            ``[B, 5, D]``) and targets ``[B, Q, D]`` (``maxsim``: ``[B, 5·Q, D]``), NaN rows padding.
        evaluation, stage2_loss, training_stage, init_checkpoint, skip_bad_steps, grad_cache_chunk, lora,
            mined_negatives: see ``RetrievalModule``.
            Stage 2 (SPN4CIR's, applied to SPRC): all of BLIP-2 is frozen (targets and prompts no longer
            change) and a trainable copy of the Q-Former's text passes, taken at the switch, fuses the
            frozen prompt with the caption against the static bank of target token sets. Under DDP run
            stage 2 as a separate run (``experiments/sprc/stage2.yaml``) or switch at epoch 0: a copy
            made later would be new parameters DDP, already wrapped around the model, never reduces.
    """

    def __init__(self, backbone: Blip2Backbone, loss: SPRCLoss | None = None,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 freeze_vision: bool = True, view_strategy: ViewStrategy = "joint",
                 evaluation: RetrievalEval | None = None, stage2_loss: nn.Module | None = None,
                 training_stage: TrainingStage = 1, init_checkpoint: str | None = None,
                 skip_bad_steps: bool = False, grad_cache_chunk: int | None = None,
                 lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__(loss=loss or SPRCLoss(), optimizer=optimizer, scheduler=scheduler, evaluation=evaluation,
                         stage2_loss=stage2_loss, training_stage=training_stage, init_checkpoint=init_checkpoint,
                         skip_bad_steps=skip_bad_steps, grad_cache_chunk=grad_cache_chunk, lora=lora,
                         mined_negatives=mined_negatives)
        save_config_hyperparameters(self, ["backbone", "loss", "optimizer", "scheduler", "stage2_loss"])
        problems = []
        if self.evaluation.backend == "faiss":
            problems.append("evaluation.backend=faiss: SPRC scores token sets by their best token, which faiss "
                            "cannot search; set it to torch (or auto)")
        positions = backbone.model.config.qformer_config.max_position_embeddings
        if backbone.max_text_length + backbone.num_query_tokens > positions:
            problems.append(f"backbone.init_args.max_text_length={backbone.max_text_length}: with the "
                            f"{backbone.num_query_tokens} prompt tokens of the text-only query it exceeds the "
                            f"Q-Former's {positions} positions")
        if problems:
            raise ValueError("model.init_args: " + "; ".join(problems))
        self.backbone = backbone
        self.backbone_name = backbone.name_or_path
        self.view_strategy = view_strategy
        self.freeze_vision = freeze_vision
        if freeze_vision:
            backbone.model.vision_model.requires_grad_(False)
        # The learnable prompt of the text-only query (loss_rtc), drawn as SPRC draws it.
        self.prompt_tokens = nn.Parameter(torch.randn(backbone.num_query_tokens, backbone.hidden_size)
                                          * backbone.initializer_range)
        if not self.loss.rtc_weight:  # only loss_rtc trains it; an unused trainable tensor stalls DDP
            self.prompt_tokens.requires_grad_(False)
        self.query_branch: TextBranch | None = None  # stage 2's trainable copy of the text passes
        self._bank_views = False

    def init_command(self) -> str:
        return ("lightning fit --config experiments/sprc/fashioniq.yaml "
                "(writes outputs/sprc_fashioniq/checkpoints/last.ckpt)")

    def image_transform(self) -> HFImageTransform:
        return self.backbone.image_transform

    def variant_switches(self) -> dict[str, bool | str]:
        return {**super().variant_switches(), "rtc": bool(self.loss.rtc_weight), "align": bool(self.loss.align_weight),
                "frozen_vision": self.freeze_vision, "views": self.view_strategy}

    # -- two stages --------------------------------------------------------------------------------
    def target_encoder(self) -> list[nn.Module]:
        return [self.backbone]

    def enter_stage2(self) -> None:
        super().enter_stage2()
        # Nothing of stage 1's objective is left to train: the bank loss replaces itc/rtc/align.
        self.prompt_tokens.requires_grad_(False)
        self.loss.requires_grad_(False)
        if self.query_branch is None:
            trainer = self._trainer
            if trainer is not None and trainer.strategy.model not in (None, self):
                raise RuntimeError("SPRC's stage 2 adds a trainable copy of the text passes, which the strategy that "
                                   "already wraps the model (DDP) would never synchronise: run stage 2 as a separate "
                                   "run (experiments/sprc/stage2.yaml) or switch at epoch 0 (StageSwitch "
                                   "switch_epoch: 0)")
            self.query_branch = self.backbone.text_branch().copy()

    def build_bank(self, gallery_batches: Iterable[dict[str, Any]], hard_negatives: int = 8) -> TargetBank:
        # The bank holds targets as training scores them (every view in one memory), whatever view
        # strategy evaluation uses, so its entries and the positives are alike.
        self._bank_views = True
        try:
            return super().build_bank(gallery_batches, hard_negatives)
        finally:
            self._bank_views = False

    # -- encoders ----------------------------------------------------------------------------------
    def _per_view(self) -> bool:
        return not self.training and not self._bank_views and self.view_strategy != "joint"

    def _branch(self) -> TextBranch:
        return self.query_branch if self.query_branch is not None else self.backbone.text_branch()

    @staticmethod
    def _single_views(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every real view as a one-view product: ``[N, 1, 3, H, W]``, its mask, and the row it came from."""
        b, v = mask.shape
        rows = torch.arange(b, device=mask.device)[:, None].expand(b, v)[mask]
        return images[mask][:, None], mask.new_ones(int(mask.sum()), 1), rows

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        images, mask, texts = batch["source_images"], batch["source_mask"], list(batch["text"])
        if not self._per_view():
            query = self.backbone.prompted_query(images, mask, texts, self._branch())
            return query if self.training else query[:, None]
        single, ones, rows = self._single_views(images, mask)
        per_view = self.backbone.prompted_query(single, ones, [texts[r] for r in rows.tolist()], self._branch())
        grid = per_view.new_zeros(*mask.shape, per_view.shape[-1])
        grid[mask] = per_view
        pooled = per_view_embeddings(grid, mask, self.view_strategy)
        return pooled[:, None] if pooled.ndim == 2 else pooled

    def encode_target(self, products: Products) -> torch.Tensor:
        images, mask = products.images, products.mask
        if not self._per_view():
            return self.backbone.target_tokens(*self.backbone.view_memory(images, mask))
        single, ones, _ = self._single_views(images, mask)
        tokens = self.backbone.target_tokens(*self.backbone.view_memory(single, ones))
        (b, v), (k, d) = mask.shape, tokens.shape[1:]
        if self.view_strategy == "meanpool":  # token k of every view of the product, averaged
            grid = tokens.new_zeros(b, v, k, d)
            grid[mask] = tokens
            weight = mask[:, :, None, None].to(tokens.dtype)
            return F.normalize((grid * weight).sum(1) / weight.sum(1).clamp(min=1.0), dim=-1)
        out = tokens.new_full((b, max(MAX_VIEWS, v), k, d), torch.nan)
        out[:, :v][mask] = tokens
        return out.reshape(b, -1, d)

    # -- stage-1 training --------------------------------------------------------------------------
    def embed_pair(self, batch: dict[str, Any]) -> TrainingPair:
        ids, text_mask = self.backbone.tokenize(list(batch["text"]))
        memory = self.backbone.view_memory(batch["source_images"], batch["source_mask"])
        prompt = self.backbone.sentence_prompt(*memory, ids, text_mask)
        branch = self._branch()
        extras = {"prompt": prompt}
        if self.loss.rtc_weight:
            extras["relative"] = branch.text_feature(ids, text_mask, prefix=self.prompt_tokens)
        return TrainingPair(branch.fuse(prompt, ids, text_mask), self.encode_target(Products.targets_of(batch)),
                            extras)

    def training_terms(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(pair.query, pair.target, relative=pair.extras.get("relative"), prompt=pair.extras["prompt"],
                         prompt_tokens=self.prompt_tokens, ids=batch_keys(batch, device=self.device))
