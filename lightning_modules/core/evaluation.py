"""Gallery evaluation of every retrieval family: the protocol, and the validation/test steps.

Dataloader 0 of an evaluation is the gallery, dataloader 1 the queries. Gallery products are
embedded with ``encode_target``, queries with the shared step; ``RecallAtK`` gathers both and
scores each query in its own dataset's gallery at the end of the epoch, beside the reference
lines a sceptic asks for: ``text_blind/`` (the source product's own embedding as the query),
``chance/``, and on generated data ``recall_subset_at_K`` and ``view_incomplete/``. A query's
Recall_subset group and view-incompleteness come from its triplet (``subset_ids``,
``view_incomplete``); real datasets have neither. Dataloader 2, when the data module has one
(``eval_sessions``), holds multi-turn sessions as turn rows: each turn's query comes from the
family's ``encode_session`` and is scored per turn in the same gallery (``core.session_eval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from datamodules.schema import stable_id
from datamodules.session_batches import is_session_batch

from ..retrieval.recall import GalleryProtocol, RecallAtK, subset_tensor
from ..retrieval.search import Backend
from .contract import Products
from .embedding import embed_product_batch
from .session_eval import SessionRecall

Split = Literal["train", "val", "test"]


@dataclass
class RetrievalEval:
    """How validation and test score retrieval (see ``RecallAtK``).

    Args:
        top_k: the K of Recall@K.
        score_k: K values whose dataset-averaged recalls are averaged into ``val/score``.
        gallery_protocol: ``all`` products of the query's dataset, or only those some query uses.
        remove_source: exclude each query's source product from its ranking (CIRR's rule; the
            generated data's default in ``configs/eval/generated.yaml``; FashionIQ and FashionMV keep it).
        backend: ``torch``: exact rank counting (a tie never goes to the target, the same on CPU and
            GPU); ``faiss``: a flat index's top list, same rule; ``auto``: faiss for single vectors on
            the CPU, torch elsewhere. Measured at parity on the CPU (``benchmarks/search_backends.py``),
            so the default is the one whose numbers do not depend on the device.
        examples: queries drawn in the retrieval picture logged after evaluation (0: none).
        loss: also log ``val/loss`` (``test/loss``), the in-batch loss of the query batches. It embeds
            every query's target a second time (Recall@K needs only the gallery's), which for
            ProCIR doubles the most expensive part of evaluation, so it is off unless asked.
    """

    top_k: tuple[int, ...] = (1, 5, 10)
    score_k: tuple[int, ...] | None = None
    gallery_protocol: GalleryProtocol = "all"
    remove_source: bool = False
    backend: Backend = "torch"
    examples: int = 4
    loss: bool = False

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

    def metric(self, label: str = "evaluation") -> RecallAtK:
        return RecallAtK(top_k=self.top_k, score_k=self.score_k, gallery_protocol=self.gallery_protocol,
                         remove_source=self.remove_source, backend=self.backend, label=label)

    def protocol(self) -> dict[str, Any]:
        """The settings that decide what a number means, for ``eval_results.json``."""
        return {"top_k": self.top_k, "score_k": self.score_k, "gallery_protocol": self.gallery_protocol,
                "remove_source": self.remove_source}


class GalleryEvaluation:
    """The evaluation half of ``RetrievalModule`` (a mixin of it, not used alone)."""

    evaluation: RetrievalEval
    recall: nn.ModuleDict
    session_recall: nn.ModuleDict
    dataset_names: list[str]
    last_gallery: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    last_ranks: dict[str, dict[str, Any]]

    def _init_evaluation(self, evaluation: RetrievalEval | None) -> None:
        self.evaluation = evaluation or RetrievalEval()
        self.dataset_names = []
        self.recall = nn.ModuleDict({split: self.evaluation.metric(split) for split in ("val", "test")})
        self.session_recall = nn.ModuleDict({split: SessionRecall(self.recall[split]) for split in ("val", "test")})
        # The last evaluated gallery, kept for callbacks (retrieval pictures, indexes) until read.
        self.last_gallery = None
        # Per dataset, the model's and the text-blind line's target ranks (Recall@K curves).
        self.last_ranks = {}

    # -- hooks a family may extend --------------------------------------------------------------
    def after_gallery_batch(self, products: Products, embedding: torch.Tensor, split: Split,
                            ids: torch.Tensor, datasets: torch.Tensor) -> None:
        """Called with every embedded gallery batch (ProCIR scores image-text retrieval here)."""

    def after_evaluation(self, split: Split) -> None:
        """Called once Recall@K of ``split`` is logged (families log their extra metrics here)."""

    def encode_session(self, batch: dict[str, Any]) -> torch.Tensor:
        """Every turn's query of a flattened session batch (``datamodules.session_batches``), one row
        per turn. The multi-turn rule of a family that reads no history: turn t is the single-turn
        query (reference p_t, text_t). A family that reads the session so far overrides this."""
        return self.encode_query(batch)

    # -- steps ---------------------------------------------------------------------------------
    def dataset_index(self, names: list[str]) -> torch.Tensor:
        for n in names:
            if n not in self.dataset_names:
                self.dataset_names.append(n)
        return torch.tensor([self.dataset_names.index(n) for n in names], device=self.device)

    def id_tensor(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([stable_id(i) for i in ids], dtype=torch.long, device=self.device)

    def evaluation_step(self, batch: dict[str, Any], split: Split) -> None:
        metric = self.recall[split]
        datasets = self.dataset_index(batch["dataset"])
        if is_session_batch(batch):  # the turns of multi-turn sessions
            self.session_recall[split].update(self.encode_session(batch), self.id_tensor(batch["target_id"]),
                                              self.id_tensor(batch["source_id"]), datasets,
                                              torch.tensor(batch["turn_index"], device=self.device))
        elif "images" in batch:  # a gallery product
            products = Products.gallery_of(batch)
            emb = embed_product_batch(self, batch)
            ids = self.id_tensor(batch["product_id"])
            metric.update(emb, ids, datasets, gallery=True)
            self.after_gallery_batch(products, emb, split, ids, datasets)
        else:
            emb, _ = self.model_step(batch, split)
            triplets = [m.get("triplet", {}) if isinstance(m, dict) else {} for m in batch.get("meta") or []]
            groups = [[stable_id(i) for i in t.get("subset_ids") or []] for t in triplets]
            subsets = subset_tensor(groups, self.device) if any(groups) else None
            flags = (torch.tensor([bool(t.get("view_incomplete")) for t in triplets], device=self.device)
                     if triplets else None)
            metric.update(emb, self.id_tensor(batch["target_id"]), datasets, gallery=False,
                          source_ids=self.id_tensor(batch["source_id"]), subsets=subsets, flags=flags)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation_step(batch, "test")

    def log_recall(self, split: Split) -> None:
        metric = self.recall[split]
        if metric.update_called:
            metric.dataset_names = self.dataset_names
            for name, value in metric.compute().items():
                self.log(f"{split}/{name}", value, prog_bar=name == "recall_at_10", sync_dist=False,
                         add_dataloader_idx=False, rank_zero_only=False)
            self.last_gallery = metric.gallery()
            self.last_ranks = metric.last_ranks
            self.log_session_recall(split)
            metric.reset()
        self.session_recall[split].reset()  # also when no gallery came: never carried into the next evaluation
        self.after_evaluation(split)

    def log_session_recall(self, split: Split) -> None:
        """Per-turn Recall@K of the sessions evaluated, ranked in the gallery just scored."""
        sessions = self.session_recall[split]
        if not sessions.update_called:
            return
        metric = self.recall[split]
        with metric.sync_context():  # the whole gallery under DDP, as the single-turn queries saw it
            gallery = metric.gallery()
        for name, value in sessions.compute(gallery, self.dataset_names).items():
            self.log(f"{split}/{name}", value, sync_dist=False, add_dataloader_idx=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self.log_recall("val")

    def on_test_epoch_end(self) -> None:
        self.log_recall("test")
