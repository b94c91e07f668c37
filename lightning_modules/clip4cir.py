"""CLIP4CIR: CLIP image and text encoders with a fusion head (sum or the CLIP4Cir Combiner).

Stage 1 (this module as configured by ``experiments/demo.yaml``) fine-tunes both encoders and the
fusion head with in-batch negatives. Multi-view products are embedded by mean-pooling the image
features of their views (the view mask excludes padding), for the source and the target alike.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from .backbones.clip import CLIPBackbone, HFImageTransform
from .fusion import SumFusion
from .losses import SymmetricInfoNCE
from .multiview import masked_mean, per_view_embeddings
from .retrieval import RetrievalEval, RetrievalModule, default_optimizer, save_config_hyperparameters

ViewStrategy = Literal["pooled", "meanpool", "maxsim"]


def view_features(backbone: CLIPBackbone, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, V, 3, H, W]`` views → ``[B, V, D]`` features, every real view through the image encoder
    in one batch; padded slots are zero."""
    b, v = mask.shape
    feats = backbone.encode_images(images[mask])
    full = feats.new_zeros(b, v, feats.shape[-1])
    full[mask] = feats
    return full


def mean_pooled_views(backbone: CLIPBackbone, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, V, 3, H, W]`` views → ``[B, D]`` product features: the mean over the real views."""
    return masked_mean(view_features(backbone, images, mask), mask)


class CLIP4CIR(RetrievalModule):
    """CLIP4CIR stage 1.

    Args:
        backbone: the CLIP encoders.
        fusion: image + text features → query (``SumFusion`` or ``Combiner``).
        loss: contrastive loss; defaults to symmetric InfoNCE, τ=0.07, learnable.
        freeze_backbone: train the fusion head only (CLIP4Cir's combiner-training stage).
        evaluation, stage2_loss, stage, init_checkpoint: see ``RetrievalModule``.
        view_strategy: how evaluation embeds multi-view products: ``pooled`` (the mean of the views'
            image features, as trained), or the FashionMV paper's single-image baselines
            ``meanpool`` and ``maxsim`` (one query per source view; see ``per_view_embeddings``). In stage 2 the
            target encoder (CLIP's image tower, shared with the reference image) is frozen; the text
            encoder and the fusion head go on training against the static bank.
    """

    def __init__(self, backbone: CLIPBackbone, fusion: nn.Module | None = None, loss: nn.Module | None = None,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 freeze_backbone: bool = False, evaluation: RetrievalEval | None = None,
                 stage2_loss: nn.Module | None = None, stage: Literal[1, 2] = 1,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False,
                 view_strategy: ViewStrategy = "pooled") -> None:
        super().__init__(loss=loss or SymmetricInfoNCE(), optimizer=optimizer, scheduler=scheduler,
                         evaluation=evaluation, stage2_loss=stage2_loss, stage=stage,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps)
        save_config_hyperparameters(self, ["backbone", "fusion", "loss", "optimizer", "scheduler", "stage2_loss"])
        self.backbone = backbone
        self.fusion = fusion or SumFusion()
        fusion_dim = getattr(self.fusion, "dim", None)
        if fusion_dim is not None and fusion_dim != backbone.dim:
            raise ValueError(
                f"model.init_args.fusion.init_args.dim={fusion_dim} but the backbone "
                f"{backbone.name_or_path!r} embeds in {backbone.dim} dimensions: set the fusion dim to {backbone.dim}."
            )
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.view_strategy = view_strategy

    def image_transform(self) -> HFImageTransform:
        return self.backbone.image_transform

    def target_encoder(self) -> list[nn.Module]:
        return [self.backbone.model.vision_model, self.backbone.model.visual_projection]

    def variant_switches(self) -> dict[str, bool | str]:
        return {**super().variant_switches(), "combiner": type(self.fusion).__name__ == "Combiner",
                "views": self.view_strategy}

    def encode_views(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pooled_views(self.backbone, images, mask)

    def _per_view(self) -> bool:
        return not self.training and self.view_strategy != "pooled"

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        text = self.backbone.encode_texts(batch["text"])
        if self._per_view():  # one query per source view (each fused with the text), then pooled
            images, mask = batch["source_images"], batch["source_mask"]
            feats = view_features(self.backbone, images, mask)
            b, v, d = feats.shape
            fused = self.fusion(feats.reshape(b * v, d), text.repeat_interleave(v, dim=0)).reshape(b, v, -1)
            return per_view_embeddings(fused, mask, self.view_strategy)
        image = self.encode_views(batch["source_images"], batch["source_mask"])
        return self.fusion(image, text)

    def encode_target(self, images: torch.Tensor, mask: torch.Tensor,
                      captions: list[str] | None = None) -> torch.Tensor:
        if self._per_view():
            return per_view_embeddings(view_features(self.backbone, images, mask), mask, self.view_strategy)
        return F.normalize(self.encode_views(images, mask), dim=-1)
