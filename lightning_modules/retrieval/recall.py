"""Recall@K over a gallery as a ``torchmetrics.Metric``.

It keeps embeddings and ids (not a score per pair), so under DDP ``compute`` all-gathers the
embeddings once and every rank scores the full query set against the full gallery, in chunks.
Each query is searched in the gallery of its own dataset (the papers' per-dataset protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .search import Backend, resolve_backend, target_ranks, topk

GalleryProtocol = Literal["all", "queries"]


class RecallAtK(Metric):
    """Hit rate: the share of queries whose target is among the K best-scoring gallery products.

    Update with ``update(embeddings, ids, datasets, gallery=True)`` for gallery products and
    ``update(embeddings, target_ids, datasets, gallery=False, source_ids=...)`` for queries.
    ``compute`` returns, for every K, ``recall_at_{k}`` over all queries, ``{dataset}/recall_at_{k}``
    and ``mean_recall_at_{k}`` (the unweighted mean over datasets), the gallery and query counts per
    dataset, and ``score``: the mean of ``mean_recall_at_{k}`` over ``score_k`` (FashionIQ:
    (R@10 + R@50) / 2; FashionMV: the average of R@5 and R@10). A gallery product seen twice (a
    DDP sampler padding, say) is counted once.

    Args:
        dataset_names: index → name of the dataset indices passed to ``update``.
        top_k: the K values.
        score_k: the K values averaged into ``score``; default: all of ``top_k``.
        gallery_protocol: ``all``: every gallery product of the query's dataset; ``queries``: only
            products that are the source or target of some query of that dataset (FashionMV, and
            FashionIQ's "VAL" protocol).
        remove_source: drop each query's own source product from its ranking.
        chunk_size: block size of the chunked exact search.
        backend: ``torch`` (exact rank counting), ``faiss`` (exact flat index top-k) or ``auto``
            (faiss for single vectors on the CPU, torch on a GPU and for MaxSim; see ``resolve_backend``).
    """

    full_state_update = False

    def __init__(self, dataset_names: Sequence[str] = ("default",), top_k: Sequence[int] = (1, 5, 10),
                 score_k: Sequence[int] | None = None, gallery_protocol: GalleryProtocol = "all",
                 remove_source: bool = False, chunk_size: int = 4096, backend: Backend = "torch",
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dataset_names = list(dataset_names)
        self.top_k = sorted(top_k)
        self.score_k = list(score_k) if score_k else list(self.top_k)
        missing = [k for k in self.score_k if k not in self.top_k]
        if missing:
            raise ValueError(f"score_k {missing} must be among top_k {self.top_k}")
        self.gallery_protocol = gallery_protocol
        self.remove_source = remove_source
        self.chunk_size = chunk_size
        self.backend = backend
        for name in ("gallery_emb", "gallery_ids", "gallery_ds", "query_emb", "query_ids", "query_src", "query_ds"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, ids: torch.Tensor, datasets: torch.Tensor, gallery: bool,
               source_ids: torch.Tensor | None = None) -> None:
        prefix = "gallery" if gallery else "query"
        getattr(self, f"{prefix}_emb").append(embeddings.detach().float())
        getattr(self, f"{prefix}_ids").append(ids.to(torch.long))
        getattr(self, f"{prefix}_ds").append(datasets.to(torch.long))
        if not gallery:
            src = source_ids if source_ids is not None else torch.full_like(ids, -1)
            self.query_src.append(src.to(device=ids.device, dtype=torch.long))

    def _cat(self, name: str) -> torch.Tensor:
        state = getattr(self, name)
        if isinstance(state, list):
            return dim_zero_cat(state) if state else torch.empty(0, dtype=torch.long, device=self.device)
        return state

    def gallery(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deduplicated (embeddings, ids, dataset indices) of the gallery seen so far (all ranks)."""
        g_emb, g_ids, g_ds = self._cat("gallery_emb"), self._cat("gallery_ids"), self._cat("gallery_ds")
        if g_ids.numel() == 0:
            return g_emb, g_ids, g_ds
        key = g_ds * (1 << 40) + (g_ids % (1 << 40))
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(key), dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(key), device=key.device), reduce="amin")
        return g_emb[first], g_ids[first], g_ds[first]

    def compute(self) -> dict[str, torch.Tensor]:
        g_emb, g_ids, g_ds = self.gallery()
        q_emb, q_ids, q_src, q_ds = (self._cat(n) for n in ("query_emb", "query_ids", "query_src", "query_ds"))
        if g_emb.numel() == 0 or q_emb.numel() == 0:
            raise RuntimeError("RecallAtK.compute() needs gallery and query embeddings; one of them is empty")
        out: dict[str, torch.Tensor] = {}
        hits_all: dict[int, list[torch.Tensor]] = {k: [] for k in self.top_k}
        per_dataset: dict[int, list[torch.Tensor]] = {k: [] for k in self.top_k}
        for d in torch.unique(q_ds).tolist():
            q_sel = q_ds == d
            g_sel = g_ds == d
            if self.gallery_protocol == "queries":
                wanted = torch.cat([q_ids[q_sel], q_src[q_sel]])
                g_sel &= torch.isin(g_ids, wanted)
            hits = self._hits(q_emb[q_sel], q_ids[q_sel], q_src[q_sel], g_emb[g_sel], g_ids[g_sel])
            name = self.dataset_names[d] if d < len(self.dataset_names) else str(d)
            for k in self.top_k:
                out[f"{name}/recall_at_{k}"] = hits[k].float().mean()
                hits_all[k].append(hits[k])
                per_dataset[k].append(out[f"{name}/recall_at_{k}"])
            out[f"{name}/gallery_size"] = torch.tensor(float(g_sel.sum()))
            out[f"{name}/queries"] = torch.tensor(float(q_sel.sum()))
        for k in self.top_k:
            out[f"recall_at_{k}"] = torch.cat(hits_all[k]).float().mean()
            out[f"mean_recall_at_{k}"] = torch.stack(per_dataset[k]).mean()
        out["score"] = torch.stack([out[f"mean_recall_at_{k}"] for k in self.score_k]).mean()
        return out

    def _hits(self, queries: torch.Tensor, query_targets: torch.Tensor, query_sources: torch.Tensor,
              gallery: torch.Tensor, gallery_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        if gallery.shape[0] == 0:  # nothing of this dataset was evaluated (limit_val_batches, say)
            return {k: torch.zeros(len(queries), dtype=torch.bool, device=queries.device) for k in self.top_k}
        order = torch.argsort(gallery_ids)  # sorted once, searched for targets and sources
        sorted_ids = gallery_ids[order]

        def index_of(wanted: torch.Tensor) -> torch.Tensor:
            pos = torch.searchsorted(sorted_ids, wanted).clamp(max=len(sorted_ids) - 1)
            found = sorted_ids[pos] == wanted
            return torch.where(found, order[pos], torch.full_like(pos, -1))

        target_index = index_of(query_targets)
        source_index = None
        if self.remove_source:
            source_index = index_of(query_sources)
            target_index[query_targets == query_sources] = -1  # a removed source cannot be the answer
        if resolve_backend(self.backend, queries) == "faiss":
            extra = 1 if source_index is not None else 0
            _, idx = topk(queries, gallery, max(self.top_k) + extra, backend="faiss")
            idx = idx.to(target_index.device)
            if source_index is not None:  # push the source out of the list, keep the order of the rest
                keep = idx != source_index[:, None]
                idx = torch.stack([row[m][: max(self.top_k)] for row, m in zip(idx, keep, strict=True)])
            return {k: (idx[:, :k] == target_index[:, None]).any(1) & (target_index >= 0) for k in self.top_k}
        ranks = target_ranks(queries, gallery, target_index, self.chunk_size, exclude_index=source_index)
        return {k: ranks < k for k in self.top_k}
