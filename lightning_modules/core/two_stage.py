"""Two-stage training (CLIP4CIR, LLaVA-caption CIR): stage 1 trains everything with in-batch
negatives; stage 2 freezes the target encoder and trains the query side against a static bank of
target embeddings plus hard negatives. ``callbacks.StageSwitch`` moves a run from 1 to 2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ..components.bank import TargetBank
from .contract import Products, TrainingPair
from .embedding import iter_product_embeddings

TrainingStage = Literal[1, 2]


class TwoStageTraining:
    """The two-stage half of ``RetrievalModule`` (a mixin of it, not used alone)."""

    training_stage: int
    loss: nn.Module
    stage2_loss: nn.Module | None
    bank: TargetBank | None

    def target_encoder(self) -> list[nn.Module]:
        """The modules that embed targets; frozen in stage 2. Families with two stages name them."""
        return []

    def enter_stage2(self) -> None:
        """Freeze the target encoder: no gradients, eval mode, and out of the optimizer (which is
        built from trainable parameters only)."""
        if self.stage2_loss is None:
            raise ValueError("stage 2 needs model.init_args.stage2_loss (e.g. lightning_modules.StaticBankLoss)")
        self.training_stage = 2
        # Stage 1's loss no longer trains either (its learnable temperature would be a trainable
        # parameter that never gets a gradient, which leaves DDP's gradient reduction unfinished).
        self.loss.requires_grad_(False)
        for module in self.target_encoder():
            module.requires_grad_(False)
            module.eval()

    def keep_frozen_in_eval(self) -> None:
        # Lightning switches every module back to train mode after validation.
        if self.training_stage == 2:
            for module in self.target_encoder():
                module.eval()

    @torch.no_grad()
    def build_bank(self, gallery_batches: Iterable[dict[str, Any]], hard_negatives: int = 8) -> TargetBank:
        """Embed every product of ``gallery_batches`` with the (frozen) target encoder."""
        encoded = iter_product_embeddings(self, gallery_batches, self.device,
                                          transfer=lambda b, d: self.transfer_batch_to_device(b, d, 0))
        self.bank = TargetBank.from_batches(((emb, batch["meta"]) for emb, batch in encoded),
                                            hard_negatives=hard_negatives).to(self.device)
        return self.bank

    def stage2_pair(self, batch: dict[str, Any]) -> TrainingPair:
        """Stage-2 training forward: the query, and the target from the frozen encoder."""
        query = self.encode_query(batch)
        with torch.no_grad():  # the target encoder is frozen: nothing of the target side trains
            target = self.encode_target(Products.targets_of(batch))
        return TrainingPair(query, target)

    def stage2_loss_terms(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage-2 loss: the query against the bank (its positive and hard negatives)."""
        return self.stage2_loss(pair.query, pair.target, self.bank, batch["target_id"], batch.get("dataset"))
