"""Per-turn Recall@K of multi-turn sessions (the Multi-turn FashionIQ / FashionNTM protocol).

At turn t of a session p0 → … → pT the query is the session so far (the references p0 … p_t and the
texts 1 … t, as the model reads them) and the answer is turn t's target p_{t+1}, ranked in the
split's gallery. Every turn is scored exactly as a single-turn query (``RecallAtK``: ties never go
to the target, ``remove_source`` removes that turn's reference p_t), beside the same reference lines:
the text-blind line of turn t is the gallery embedding of p_t, i.e. "show me what I clicked".
Logged as ``{split}/turn_{t}/recall_at_{K}``, ``{split}/turn_{t}/text_blind/recall_at_{K}``,
``{split}/turn_{t}/chance/recall_at_{K}`` and ``{split}/turn_{t}/queries`` (t 1-based).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..retrieval.recall import RecallAtK

# What a turn reports of a ``RecallAtK`` result: the pooled lines (the datasets' own are the
# single-turn table's business) and the query counts.
TURN_LINES = ("recall_at_", "text_blind/recall_at_", "chance/recall_at_")


class SessionRecall(Metric):
    """Session queries kept by turn; ``compute(gallery)`` scores every turn in that gallery.

    ``settings`` are the single-turn metric's (``RetrievalEval.metric``): the same K, gallery
    protocol, source removal and backend, so a turn's number reads as a single-turn number does.
    Under DDP the states are gathered as ``RecallAtK``'s; the gallery passed in must be the whole one.
    """

    full_state_update = False

    def __init__(self, settings: RecallAtK, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.settings = {"top_k": settings.top_k, "score_k": settings.score_k,
                         "gallery_protocol": settings.gallery_protocol, "remove_source": settings.remove_source,
                         "backend": settings.backend, "chunk_size": settings.chunk_size}
        self.label = settings.label
        for name in ("emb", "target", "source", "ds", "turn"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, target_ids: torch.Tensor, source_ids: torch.Tensor,
               datasets: torch.Tensor, turns: torch.Tensor) -> None:
        """One batch of turn queries; ``turns`` 0-based."""
        self.emb.append(embeddings.detach().float())
        for name, value in (("target", target_ids), ("source", source_ids), ("ds", datasets), ("turn", turns)):
            getattr(self, name).append(value.to(device=embeddings.device, dtype=torch.long))

    def compute(self, gallery: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                dataset_names: list[str]) -> dict[str, torch.Tensor]:
        """``{turn_{t}/<line>: value}`` for every turn with queries (t 1-based)."""
        emb, target, source, ds, turn = (dim_zero_cat(getattr(self, n)) for n in ("emb", "target", "source", "ds",
                                                                                  "turn"))
        g_emb, g_ids, g_ds = gallery
        out: dict[str, torch.Tensor] = {}
        for t in torch.unique(turn).tolist():
            sel = turn == t
            # Gathered already (this metric's own sync): the per-turn metric must not gather again.
            metric = RecallAtK(dataset_names, label=f"{self.label} sessions, turn {t + 1}", sync_on_compute=False,
                               **self.settings).to(emb.device)
            metric.update(g_emb, g_ids, g_ds, gallery=True)
            metric.update(emb[sel], target[sel], ds[sel], gallery=False, source_ids=source[sel])
            result: dict[str, Any] = metric.compute()
            for name, value in result.items():
                if name.startswith(TURN_LINES):
                    out[f"turn_{t + 1}/{name}"] = value
            out[f"turn_{t + 1}/queries"] = torch.tensor(float(sel.sum()))
        return out
