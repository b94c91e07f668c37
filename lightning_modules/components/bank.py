"""A static bank of target embeddings for stage-2 training, with precomputed hard negatives.

Once the target encoder is frozen, target embeddings no longer change: they are computed once over
every training product (and refreshed every N epochs if asked) and the query side is trained
against all of them, far more negatives than a batch holds. Hard negatives are bank entries that
look like the target (high cosine similarity) but differ in attributes: the same category with a
different colour, pattern, ... They are precomputed per bank entry, in chunks.

An entry is one vector ``[D]`` or several ``[K, D]`` (SPRC's target tokens, scored by the best
token; rows of NaN are padding): the bank stores whatever ``encode_target`` returns. A product is
(dataset, product id), the key of ``false_negatives.product_key``: two datasets may reuse an id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..retrieval.distributed import gather_objects
from .false_negatives import product_key, product_keys


class TargetBank:
    """Embeddings, ids, categories and attributes of every bank product; hard negatives per entry.
    ``datasets``: each entry's dataset (None: one unnamed dataset, ids alone identify products)."""

    def __init__(self, embeddings: torch.Tensor, ids: list[str], categories: list[str],
                 attributes: list[dict[str, str]], hard_negatives: int = 8, chunk_size: int = 2048,
                 datasets: list[str] | None = None) -> None:
        datasets = list(datasets) if datasets is not None else [""] * len(ids)
        if not len(embeddings) == len(ids) == len(categories) == len(attributes) == len(datasets):
            raise ValueError("bank embeddings, ids, categories, attributes and datasets differ in length")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = list(ids)
        self.datasets = datasets
        self.keys = product_keys(self.ids, datasets, embeddings.device)
        self.categories = list(categories)
        self.attributes = list(attributes)
        self._row = {k: i for i, k in enumerate(self.keys.tolist())}
        self.hard = self._mine_hard(hard_negatives, chunk_size)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[torch.Tensor, list[dict[str, Any]]]], **kw: Any) -> TargetBank:
        """Build from (embeddings, metas) batches; under DDP every rank ends with the whole bank."""
        rows: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for emb, metas in batches:
            rows += list(zip(emb.detach().float().cpu(), metas, strict=True))
        unique: dict[tuple[str, str], tuple[torch.Tensor, dict[str, Any]]] = {}
        for emb, meta in gather_objects(rows):
            unique.setdefault((meta.get("dataset", ""), meta["product_id"]), (emb, meta))
        if not unique:
            raise ValueError("the target bank is empty: the training gallery shards hold no products")
        items = list(unique.values())
        return cls(torch.stack([e for e, _ in items]), [m["product_id"] for _, m in items],
                   [m.get("category", "") for _, m in items], [m.get("attributes") or {} for _, m in items],
                   datasets=[m.get("dataset", "") for _, m in items], **kw)

    def to(self, device: torch.device) -> TargetBank:
        self.embeddings, self.keys, self.hard = (t.to(device) for t in (self.embeddings, self.keys, self.hard))
        return self

    def rows(self, ids: list[str], datasets: list[str] | None = None) -> torch.Tensor:
        """Bank row of each product (-1 when absent)."""
        datasets = datasets if datasets is not None else [""] * len(ids)
        return torch.tensor([self._row.get(product_key(d, i), -1) for d, i in zip(datasets, ids, strict=True)],
                            dtype=torch.long, device=self.embeddings.device)

    def summary(self) -> torch.Tensor:
        """One unit vector per entry ``[N, D]``: the entry itself, or the normalised mean of its tokens.
        Hard negatives only need to look alike; mining them by the best token pair would cost K² times
        as much (1,024 times for SPRC's 32 tokens)."""
        if self.embeddings.ndim == 2:
            return self.embeddings
        real = ~self.embeddings[..., :1].isnan()
        return F.normalize(self.embeddings.nan_to_num(0.0).sum(1) / real.sum(1).clamp(min=1), dim=-1)

    def _mine_hard(self, k: int, chunk_size: int) -> torch.Tensor:
        """Per entry, the ``k`` most similar entries of the same category whose attributes differ."""
        n = len(self.ids)
        hard = torch.full((n, k), -1, dtype=torch.long, device=self.embeddings.device)
        if k == 0 or n < 2:
            return hard
        cats = {c: i for i, c in enumerate(sorted(set(self.categories)))}
        cat = torch.tensor([cats[c] for c in self.categories], device=self.embeddings.device)
        # Products without attributes (FashionIQ) get a key of their own: any other product differs.
        keys = [str(sorted(a.items())) if a else f"#{i}" for i, a in enumerate(self.attributes)]
        attr_index = {a: i for i, a in enumerate(sorted(set(keys)))}
        attr = torch.tensor([attr_index[a] for a in keys], device=cat.device)
        summary = self.summary()
        for s in range(0, n, chunk_size):
            sim = summary[s : s + chunk_size] @ summary.T
            rows = torch.arange(s, min(s + chunk_size, n), device=sim.device)
            allowed = (cat[rows, None] == cat[None]) & (attr[rows, None] != attr[None])
            allowed[torch.arange(len(rows)), rows] = False  # never the entry itself
            sim = sim.masked_fill(~allowed, -torch.inf)
            val, idx = sim.topk(min(k, n), dim=1)
            hard[s : s + chunk_size, : idx.shape[1]] = torch.where(val > -torch.inf, idx, -1)[:, :k]
        return hard
