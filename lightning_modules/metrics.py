"""Recall@K over a gallery as a ``torchmetrics.Metric``.

It keeps embeddings and ids (not a score per pair), so under DDP ``compute`` all-gathers the
embeddings once and every rank scores the full query set against the full gallery, in chunks.
Each query is searched in the gallery of its own dataset (the papers' per-dataset protocol).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .search import Backend, target_ranks, topk


def stable_id(text: str) -> int:
    """A process-independent 63-bit integer for a string id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class RecallAtK(Metric):
    """Hit rate: the share of queries whose target is among the K best-scoring gallery products.

    Update with ``update(embeddings, ids, datasets, gallery=True)`` for gallery products and
    ``gallery=False`` for queries (``ids`` = target ids). ``compute`` returns ``recall_at_{k}``
    over all queries and ``{dataset}/recall_at_{k}``, plus gallery and query counts per dataset.
    A gallery product seen twice (a DDP sampler padding, say) is counted once.

    Args:
        dataset_names: index → name of the dataset indices passed to ``update``.
        top_k: the K values.
        chunk_size: block size of the chunked exact search.
        backend: ``torch`` (exact rank counting) or ``faiss`` (exact flat index top-k).
    """

    full_state_update = False

    def __init__(self, dataset_names: Sequence[str] = ("default",), top_k: Sequence[int] = (1, 5, 10),
                 chunk_size: int = 4096, backend: Backend = "torch", **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dataset_names = list(dataset_names)
        self.top_k = sorted(top_k)
        self.chunk_size = chunk_size
        self.backend = backend
        for prefix in ("gallery", "query"):
            self.add_state(f"{prefix}_emb", default=[], dist_reduce_fx="cat")
            self.add_state(f"{prefix}_ids", default=[], dist_reduce_fx="cat")
            self.add_state(f"{prefix}_ds", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, ids: torch.Tensor, datasets: torch.Tensor,
               gallery: bool) -> None:
        prefix = "gallery" if gallery else "query"
        getattr(self, f"{prefix}_emb").append(embeddings.detach().float())
        getattr(self, f"{prefix}_ids").append(ids.to(torch.long))
        getattr(self, f"{prefix}_ds").append(datasets.to(torch.long))

    def _cat(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        state = getattr(self, name)
        if isinstance(state, list):
            if not state:
                return torch.empty(0, dtype=torch.long if like is None else like.dtype, device=self.device)
            return dim_zero_cat(state)
        return state

    def compute(self) -> dict[str, torch.Tensor]:
        g_emb, g_ids, g_ds = self._cat("gallery_emb"), self._cat("gallery_ids"), self._cat("gallery_ds")
        q_emb, q_ids, q_ds = self._cat("query_emb"), self._cat("query_ids"), self._cat("query_ds")
        if g_emb.numel() == 0 or q_emb.numel() == 0:
            raise RuntimeError("RecallAtK.compute() needs gallery and query embeddings; one of them is empty")
        # Keep the first copy of each (dataset, id) gallery entry.
        key = g_ds * (1 << 40) + (g_ids % (1 << 40))
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(key), dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(key), device=key.device), reduce="amin")
        g_emb, g_ids, g_ds = g_emb[first], g_ids[first], g_ds[first]

        out: dict[str, torch.Tensor] = {}
        hits_all = {k: [] for k in self.top_k}
        for d in torch.unique(q_ds).tolist():
            q_sel, g_sel = q_ds == d, g_ds == d
            gal, gal_ids, qe, qt = g_emb[g_sel], g_ids[g_sel], q_emb[q_sel], q_ids[q_sel]
            hits = self._hits(qe, qt, gal, gal_ids)
            name = self.dataset_names[d] if d < len(self.dataset_names) else str(d)
            for k in self.top_k:
                out[f"{name}/recall_at_{k}"] = hits[k].float().mean()
                hits_all[k].append(hits[k])
            out[f"{name}/gallery_size"] = torch.tensor(float(gal.shape[0]))
            out[f"{name}/queries"] = torch.tensor(float(qe.shape[0]))
        for k in self.top_k:
            out[f"recall_at_{k}"] = torch.cat(hits_all[k]).float().mean()
        return out

    def _hits(self, queries: torch.Tensor, query_targets: torch.Tensor, gallery: torch.Tensor,
              gallery_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        order = torch.argsort(gallery_ids)
        sorted_ids = gallery_ids[order]
        pos = torch.searchsorted(sorted_ids, query_targets).clamp(max=max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == query_targets if len(sorted_ids) else torch.zeros_like(query_targets).bool()
        target_index = torch.where(found, order[pos], torch.full_like(pos, -1))
        if self.backend == "faiss":
            _, idx = topk(queries, gallery, max(self.top_k), backend="faiss")
            idx = idx.to(target_index.device)
            return {k: (idx[:, :k] == target_index[:, None]).any(1) & found for k in self.top_k}
        ranks = target_ranks(queries, gallery, target_index, self.chunk_size)
        return {k: ranks < k for k in self.top_k}
