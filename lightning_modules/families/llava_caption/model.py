"""LLaVA-caption CIR ("Exploring Multi-Modal LLMs and Two-Stage Fine-Tuning for Fashion Image
Retrieval"): MLLM captions of the reference enrich the query text; the target is its image plus
its caption through a frozen CLIP text encoder; hybrid negatives; two-stage fine-tuning.

Query: CLIP image features of the reference views (mean-pooled) and CLIP text features of the
modification text ⊕ the reference caption C_r (or the MLLM's synthesised modified text), fused by a
2-layer transformer; with ``query_text_encoder``, BLIP-2 sentence-level prompting over the reference
views and that text gives the text feature instead (the paper's use of SPRC's prompts). Target: CLIP
image features of the target views plus the target caption C_t through a frozen copy of the CLIP text
encoder. Captions come from ``cir caption`` (LLaVA, Qwen3.5,
or the generator's own captions) through the DataModule's ``captions_file``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ...backbones.clip import CLIPBackbone, HFImageTransform
from ...components.false_negatives import batch_keys, false_negative_mask
from ...components.fusion import TransformerFusion, check_fusion_width
from ...components.hybrid_negatives import HybridNegativesLoss
from ...components.mined_negatives import MinedNegativesLoss
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
from .lexicon import perturb_caption
from .prompted_text import SentencePromptEncoder
from .target_text import FrozenTextEncoder

QueryText = Literal["modification+caption", "modified_text", "modification"]


class LLaVACaptionCIR(RetrievalModule):
    """The LLaVA-caption CIR model.

    Args:
        backbone: CLIP encoders (image and trainable query text).
        fusion: image + text → query; default ``TransformerFusion`` (2 layers).
        loss: hybrid-negative loss (in-batch, synthetic, augmented; each weighted, each switchable).
        query_text: ``modification+caption`` (modification text, then C_r: CLIP truncates at the end,
            so the modification comes first), ``modified_text`` (the MLLM's synthesised text) or
            ``modification`` alone (ablation).
        query_text_encoder: how the query text is encoded: None, the CLIP text encoder (the default);
            a ``SentencePromptEncoder``, BLIP-2 sentence-level prompting (reference views + query text →
            prompt → [prompt; text] feature), trained with the query side; its ``dim`` must be the CLIP
            width the fusion head takes.
        target_caption_weight: weight of the frozen C_t feature in the target (0: image only).
        synthetic_negatives: perturbed target captions per query.
        augmented_negatives: cross-combined targets per query.
        seed: seed of the caption perturbations (``sample_rng``).
        evaluation, stage2_loss, training_stage, init_checkpoint, skip_bad_steps, grad_cache_chunk, lora,
            mined_negatives: see ``RetrievalModule``.
    """

    def __init__(self, backbone: CLIPBackbone, fusion: nn.Module | None = None, loss: nn.Module | None = None,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 query_text: QueryText = "modification+caption",
                 query_text_encoder: SentencePromptEncoder | None = None, target_caption_weight: float = 1.0,
                 synthetic_negatives: int = 4, augmented_negatives: int = 2, seed: int = 0,
                 evaluation: RetrievalEval | None = None, stage2_loss: nn.Module | None = None,
                 training_stage: TrainingStage = 1, init_checkpoint: str | None = None,
                 skip_bad_steps: bool = False, grad_cache_chunk: int | None = None,
                 lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__(loss=loss or HybridNegativesLoss(), optimizer=optimizer, scheduler=scheduler,
                         evaluation=evaluation, stage2_loss=stage2_loss, training_stage=training_stage,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps,
                         grad_cache_chunk=grad_cache_chunk, lora=lora,
                         mined_negatives=mined_negatives)
        save_config_hyperparameters(self, ["backbone", "fusion", "loss", "optimizer", "scheduler", "stage2_loss",
                                           "query_text_encoder"])
        self.backbone = backbone
        self.backbone_name = backbone.name_or_path
        self.fusion = fusion or TransformerFusion(backbone.dim)
        check_fusion_width(self.fusion, backbone.dim, backbone.name_or_path)
        if query_text_encoder is not None and query_text_encoder.dim != backbone.dim:
            raise ValueError(f"model.init_args.query_text_encoder.init_args.dim={query_text_encoder.dim} but the "
                             f"fusion head takes the CLIP backbone's {backbone.dim} dimensions: set it to "
                             f"{backbone.dim}.")
        self.query_text_encoder = query_text_encoder
        self.target_text = FrozenTextEncoder(backbone)
        self.query_text = query_text
        self.target_caption_weight = target_caption_weight
        self.synthetic_negatives = synthetic_negatives
        self.augmented_negatives = augmented_negatives
        self.random_seed = seed

    def init_command(self) -> str:
        return "lightning fit --config experiments/llava_caption/fashioniq.yaml (its last.ckpt, at the switch)"

    def image_transform(self) -> HFImageTransform:
        return self.backbone.image_transform

    def target_encoder(self) -> list[nn.Module]:
        return [self.backbone.model.vision_model, self.backbone.model.visual_projection, self.target_text]

    def variant_switches(self) -> dict[str, bool | str]:
        weights = self.loss.weights if isinstance(self.loss, HybridNegativesLoss) else {}
        return {**super().variant_switches(), "captions": self.query_text != "modification",
                "synthetic": bool(self.synthetic_negatives and weights.get("synthetic")),
                "augmented": bool(self.augmented_negatives and weights.get("augmented")),
                "target_caption": bool(self.target_caption_weight),
                "query_encoder": "clip" if self.query_text_encoder is None else "blip2_prompt"}

    # -- encoders --------------------------------------------------------------------------------
    def query_texts(self, batch: dict[str, Any]) -> list[str]:
        mods = batch["text"]
        if self.query_text == "modification":
            return list(mods)
        if self.query_text == "modified_text":
            return [m2 or m for m, m2 in zip(mods, batch.get("modified_text") or mods, strict=True)]
        captions = batch.get("source_caption") or [""] * len(mods)
        return [f"{m} . {c}" if c else m for m, c in zip(mods, captions, strict=True)]

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        images, mask, texts = batch["source_images"], batch["source_mask"], self.query_texts(batch)
        image = self.backbone.encode_products(images, mask)
        if self.query_text_encoder is None:
            return self.fusion(image, self.backbone.encode_texts(texts))
        return self.fusion(image, self.query_text_encoder(images, mask, texts))

    def compose_target(self, image: torch.Tensor, caption_features: torch.Tensor | None) -> torch.Tensor:
        out = F.normalize(image, dim=-1)
        if caption_features is not None and self.target_caption_weight:
            out = out + self.target_caption_weight * F.normalize(caption_features.to(out.dtype), dim=-1)
        return F.normalize(out, dim=-1)

    def encode_target(self, products: Products) -> torch.Tensor:
        image = self.backbone.encode_products(products.images, products.mask)
        captions = products.captions
        return self.compose_target(image, self.target_text(captions) if captions else None)

    # -- hybrid negatives ------------------------------------------------------------------------
    def synthetic_targets(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Targets whose caption had attribute words swapped: [B, S, d] and a [B, S] validity mask
        (all False where no caption word could be swapped)."""
        captions = batch.get("target_caption")
        if not self.synthetic_negatives or not captions:
            return None
        texts, valid = [], []
        for c, dataset, target in zip(captions, batch.get("dataset") or [""] * len(captions),
                                       batch["target_id"], strict=True):
            for j in range(self.synthetic_negatives):
                p = perturb_caption(c, self.sample_rng("synthetic", dataset, target, j)) if c else None
                valid.append(p is not None and p != c)
                texts.append(p if p is not None else c or "")
        b, s = len(captions), self.synthetic_negatives
        with torch.no_grad():
            image = self.backbone.encode_products(batch["target_images"], batch["target_mask"])
        caption_feats = self.target_text(texts).view(b, s, -1)
        negatives = self.compose_target(image[:, None].expand(b, s, -1), caption_feats)
        return negatives, torch.tensor(valid, device=negatives.device).view(b, s)

    def augmentation_keys(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen text features that pair queries for cross-combination: the reference caption,
        or the modification text where there is none."""
        keys = batch.get("source_caption") or batch["text"]
        keys = [k or t for k, t in zip(keys, batch["text"], strict=True)]
        return F.normalize(self.target_text(keys), dim=-1)

    def augmented_targets(self, batch: dict[str, Any], target: torch.Tensor,
                          keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cross-combined triplets: for query i, targets j of the batch whose reference caption (or
        modification text; ``keys``) is most like i's but whose target caption differs."""
        n = target.shape[0]
        if n < 2:
            return None
        sim = keys @ keys.T
        captions = batch.get("target_caption") or [""] * n
        same = torch.tensor([[captions[i] == captions[j] for j in range(n)] for i in range(n)], device=sim.device)
        keys = batch_keys(batch, device=sim.device)
        if keys is not None:  # the same product (dataset, id), as every other term masks it
            same |= false_negative_mask(keys, keys)
        sim = sim.masked_fill(same, -torch.inf)  # never the positive, nor a copy of it
        k = min(self.augmented_negatives, n - 1)
        val, idx = sim.topk(k, dim=1)
        return target[idx], val > -torch.inf

    def embed_pair(self, batch: dict[str, Any]) -> TrainingPair:
        pair = super().embed_pair(batch)
        if not isinstance(self.loss, HybridNegativesLoss):
            return pair
        synthetic = self.synthetic_targets(batch)
        if synthetic is not None:
            pair.extras["synthetic"], pair.extras["synthetic_valid"] = synthetic
        if self.augmented_negatives:
            pair.extras["augmentation_keys"] = self.augmentation_keys(batch)
        return pair

    def training_terms(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(self.loss, HybridNegativesLoss):  # another loss: in-batch negatives only
            return super().training_terms(pair, batch)
        synthetic = augmented = None
        valid = pair.extras.get("synthetic_valid")
        if valid is not None and bool(valid.any()):
            synthetic = pair.extras["synthetic"], valid
        if "augmentation_keys" in pair.extras:
            augmented = self.augmented_targets(batch, pair.target.detach(), pair.extras["augmentation_keys"])
        return self.loss.terms(pair.query, pair.target, synthetic=synthetic, augmented=augmented,
                               ids=batch_keys(batch, device=self.device))
