"""Zero-shot MLLM embedders as CIR models, with the FashionMV paper's multi-view strategies.

A query is one request holding the source product's views and the modification text, under the
card's query instruction; a document is one request holding the product's views, under the document
instruction (``backbones.vl_embedder``). Multi-view products are embedded as the paper's eq. 14-16:
``joint`` (all views in one request), ``meanpool`` (one request per view, embeddings averaged;
``meanpool_normalised`` is the same here, the embeddings being unit-norm already) or
``maxsim`` (one request per view, scored by the best view pair through ``retrieval.search.maxsim``;
a query's per-view requests each carry the modification text).

``lightning validate`` runs them without a checkpoint. ``lightning fit`` fine-tunes them with the
same contrastive step as the other families (joint requests, symmetric InfoNCE).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ...backbones.qwen import PatchedImage, QwenImageTransform
from ...backbones.qwen_chat import Dialogue
from ...backbones.vl_embedder import Role, VLEmbedderBackbone
from ...components.infonce import SymmetricInfoNCE
from ...components.mined_negatives import MinedNegativesLoss
from ...components.multiview import pool_view_rows
from ...core import Products, RetrievalEval, RetrievalModule, save_config_hyperparameters
from ...core.adapters import LoraSettings

ViewStrategy = Literal["joint", "meanpool", "meanpool_normalised", "maxsim"]


def embedder_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at a fine-tuning rate for billion-parameter models: lr 1e-5, weight decay 0.01."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)


class MLLMEmbedder(RetrievalModule):
    """A multimodal embedding model scored as a CIR model.

    Args:
        backbone: the embedding model and its card (prompt format, pooled token, image limits).
        view_strategy: ``joint``, ``meanpool``, ``meanpool_normalised`` or ``maxsim`` (evaluation; training
            is always joint).
        query_instruction, document_instruction: replace the card's instructions (None: the card's).
        loss: contrastive loss of fine-tuning; default symmetric InfoNCE at a fixed τ = 0.05.
        optimizer, scheduler, evaluation, init_checkpoint, skip_bad_steps, grad_cache_chunk, lora,
            mined_negatives: see ``RetrievalModule``.
    """

    def __init__(self, backbone: VLEmbedderBackbone, view_strategy: ViewStrategy = "joint",
                 query_instruction: str | None = None, document_instruction: str | None = None,
                 loss: nn.Module | None = None, optimizer: OptimizerCallable = embedder_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False,
                 grad_cache_chunk: int | None = None,
                 lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__(loss=loss or SymmetricInfoNCE(temperature=0.05, learnable_temperature=False),
                         optimizer=optimizer, scheduler=scheduler, evaluation=evaluation,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps,
                         grad_cache_chunk=grad_cache_chunk, lora=lora,
                         mined_negatives=mined_negatives)
        save_config_hyperparameters(self, ["backbone", "loss", "optimizer", "scheduler"])
        if view_strategy == "maxsim" and self.evaluation.backend == "faiss":
            raise ValueError("model.init_args: view_strategy=maxsim scores view pairs, which faiss cannot: set "
                             "evaluation.backend=torch (or auto)")
        self.backbone = backbone
        self.backbone_name = backbone.name_or_path
        self.view_strategy = view_strategy
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction

    def image_transform(self) -> QwenImageTransform:
        return self.backbone.image_transform

    def variant_switches(self) -> dict[str, bool | str]:
        return {"views": self.view_strategy}

    def init_command(self) -> str:
        return "lightning fit --config experiments/baselines/<model>_joint.yaml (its last.ckpt)"

    def _request(self, views: list[PatchedImage], text: str, role: Role) -> Dialogue:
        override = self.query_instruction if role == "query" else self.document_instruction
        return self.backbone.request(views, text, role, override)

    def _embed(self, products: list[list[PatchedImage]], texts: list[str], role: Role) -> torch.Tensor:
        """Joint: one request per product. Per view: one request per view (each with the product's
        text), then mean-pooled or kept as NaN-padded multi-vectors for MaxSim."""
        strategy = "joint" if self.training else self.view_strategy
        if strategy == "joint":
            return self.backbone.embed([self._request(v, t, role) for v, t in zip(products, texts, strict=True)])
        emb = self.backbone.embed([self._request([view], t, role)
                                   for views, t in zip(products, texts, strict=True) for view in views])
        return pool_view_rows(emb, [len(v) for v in products], strategy)

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._embed(batch["source_images"], batch["text"], "query")

    def encode_target(self, products: Products) -> torch.Tensor:
        return self._embed(products.images, [""] * len(products), "document")
