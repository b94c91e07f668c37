"""CLIP4CIR: CLIP image and text encoders with a fusion head (sum or the CLIP4Cir Combiner).

Stage 1 (this module as configured by ``experiments/demos/clip4cir.yaml``) fine-tunes both encoders and the
fusion head with in-batch negatives.

Multi-view products, in training (always) and in evaluation under ``view_strategy: pooled`` (the
default), are embedded by averaging the *unnormalised* CLIP image features of their real views
(``CLIPBackbone.encode_products``: the masked mean of the visual projection's outputs, padding
excluded), for the source and the target alike; this is neither of the FashionMV paper's per-view
strategies:

- target: the L2-normalised mean of the raw view features, so a view with a larger feature norm
  weighs more (the same vector as ``meanpool``, eq. 15, gives for a target);
- query: that raw mean is fused with the text feature *once*. ``SumFusion`` normalises it first, so
  only its direction counts; the ``Combiner`` takes it as it is, in its projection and in its
  residual ``(1 - λ)·image``, so its norm (smaller when the views disagree) counts too. The paper's
  MeanPool instead fuses each source view with the text and averages the fused queries.

The contrastive loss then L2-normalises query and target. ``view_strategy`` ``meanpool``,
``meanpool_normalised`` and ``maxsim`` apply in evaluation only: one query per source view (each
fused with the text; the fusion heads' outputs are unit-norm, so the two MeanPool variants give the
same query) and one embedding per target view (raw CLIP features: ``meanpool`` averages them as they
are, ``meanpool_normalised`` normalises each first), pooled by ``per_view_embeddings``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ...backbones.clip import CLIPBackbone, HFImageTransform
from ...components.fusion import Combiner, SumFusion, check_fusion_width
from ...components.infonce import SymmetricInfoNCE
from ...components.mined_negatives import MinedNegativesLoss
from ...components.multiview import per_view_embeddings
from ...core import (
    Products,
    RetrievalEval,
    RetrievalModule,
    TrainingStage,
    default_optimizer,
    save_config_hyperparameters,
)
from ...core.adapters import LoraSettings

ViewStrategy = Literal["pooled", "meanpool", "meanpool_normalised", "maxsim"]


class CLIP4CIR(RetrievalModule):
    """CLIP4CIR stage 1.

    Args:
        backbone: the CLIP encoders.
        fusion: image + text features → query (``SumFusion`` or ``Combiner``).
        loss: contrastive loss; defaults to symmetric InfoNCE, τ=0.07, learnable.
        freeze_backbone: train the fusion head only (CLIP4Cir's combiner-training stage).
        evaluation, stage2_loss, training_stage, init_checkpoint, skip_bad_steps, grad_cache_chunk, lora,
            mined_negatives: see ``RetrievalModule``.
        view_strategy: how evaluation embeds multi-view products: ``pooled`` (the mean of the views'
            unnormalised image features, as trained; see above), or the FashionMV paper's single-image
            baselines ``meanpool`` (eq. 15), ``meanpool_normalised`` (views normalised before the mean)
            and ``maxsim`` (one query per source view; see ``per_view_embeddings``). In stage 2 the
            target encoder (CLIP's image tower, shared with the reference image) is frozen; the text
            encoder and the fusion head go on training against the static bank.
    """

    def __init__(self, backbone: CLIPBackbone, fusion: nn.Module | None = None, loss: nn.Module | None = None,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 freeze_backbone: bool = False, evaluation: RetrievalEval | None = None,
                 stage2_loss: nn.Module | None = None, training_stage: TrainingStage = 1,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False,
                 view_strategy: ViewStrategy = "pooled", grad_cache_chunk: int | None = None,
                 lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__(loss=loss or SymmetricInfoNCE(), optimizer=optimizer, scheduler=scheduler,
                         evaluation=evaluation, stage2_loss=stage2_loss, training_stage=training_stage,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps,
                         grad_cache_chunk=grad_cache_chunk, lora=lora,
                         mined_negatives=mined_negatives)
        save_config_hyperparameters(self, ["backbone", "fusion", "loss", "optimizer", "scheduler", "stage2_loss"])
        self.backbone = backbone
        self.backbone_name = backbone.name_or_path
        self.fusion = fusion or SumFusion()
        check_fusion_width(self.fusion, backbone.dim, backbone.name_or_path)
        if view_strategy == "maxsim" and self.evaluation.backend == "faiss":
            raise ValueError("model.init_args: view_strategy=maxsim scores view pairs, which faiss cannot: set "
                             "evaluation.backend=torch (or auto)")
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.view_strategy = view_strategy

    def image_transform(self) -> HFImageTransform:
        return self.backbone.image_transform

    def target_encoder(self) -> list[nn.Module]:
        return [self.backbone.model.vision_model, self.backbone.model.visual_projection]

    def variant_switches(self) -> dict[str, bool | str]:
        return {**super().variant_switches(), "combiner": isinstance(self.fusion, Combiner),
                "views": self.view_strategy}

    def _per_view(self) -> bool:
        return not self.training and self.view_strategy != "pooled"

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        text = self.backbone.encode_texts(batch["text"])
        if self._per_view():  # one query per source view (each fused with the text), then pooled
            images, mask = batch["source_images"], batch["source_mask"]
            feats = self.backbone.encode_view_grid(images, mask)
            b, v, d = feats.shape
            fused = self.fusion(feats.reshape(b * v, d), text.repeat_interleave(v, dim=0)).reshape(b, v, -1)
            return per_view_embeddings(fused, mask, self.view_strategy)
        image = self.backbone.encode_products(batch["source_images"], batch["source_mask"])
        return self.fusion(image, text)

    def encode_target(self, products: Products) -> torch.Tensor:
        images, mask = products.images, products.mask
        if self._per_view():
            return per_view_embeddings(self.backbone.encode_view_grid(images, mask), mask, self.view_strategy)
        return F.normalize(self.backbone.encode_products(images, mask), dim=-1)
