"""Recall@K over a gallery as a ``torchmetrics.Metric``.

It keeps embeddings and ids (not a score per pair), so under DDP ``compute`` all-gathers the
embeddings once and every rank scores the full query set against the full gallery, in chunks.
Each query is searched in the gallery of its own dataset (the papers' per-dataset protocol).

Ranks are pessimistic: a gallery item other than the target that scores exactly as high as the
target ranks above it, on every backend, so constant, zero or collapsed embeddings score nothing
instead of everything. Non-finite embeddings stop the evaluation (``NonFiniteEmbeddings``).

Beside the model's numbers every evaluation computes its reference lines: the **text-blind** line
(each query replaced by the model's own gallery embedding of its source product, the text ignored,
under the same protocol), chance (K over the gallery each query is ranked in), and, where queries
carry a group of near-duplicates, CIRR's Recall_subset@K (the target ranked only among its group).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .metric_names import REFERENCE_LINES, TURN_PATTERN
from .search import Backend, faiss_target_ranks, resolve_backend, similarities, target_ranks

GalleryProtocol = Literal["all", "queries"]


SUBSET_WIDTH = 16  # ids a query's Recall_subset group may hold (fixed so DDP can concatenate the state)
SUBSET_K = (1, 2, 3)  # CIRR's K for Recall_subset
MISS = torch.iinfo(torch.long).max  # the rank of a query that cannot be answered (no gallery, no source)


class NonFiniteEmbeddings(ValueError):
    """Evaluation met NaN or infinite embeddings; no score is computed from them."""


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per item: all its values finite. Multi-vector items ``[n, V, D]`` may pad missing views with
    rows that are entirely NaN; an item needs at least one real row and no other non-finite value."""
    if x.ndim == 2:
        return torch.isfinite(x).all(-1)
    padding = x.isnan().all(-1)
    return (torch.isfinite(x).all(-1) | padding).all(-1) & ~padding.all(-1)


def subset_tensor(groups: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, SUBSET_WIDTH]`` ids of each query's Recall_subset group, padded with -1."""
    out = torch.full((len(groups), SUBSET_WIDTH), -1, dtype=torch.long)
    for i, g in enumerate(groups):
        if len(g) > SUBSET_WIDTH:
            raise ValueError(f"a Recall_subset group of {len(g)} products; at most {SUBSET_WIDTH} are supported")
        out[i, : len(g)] = torch.tensor(list(g), dtype=torch.long)
    return out.to(device)


class RecallAtK(Metric):
    """Hit rate: the share of queries whose target is among the K best-scoring gallery products.

    Update with ``update(embeddings, ids, datasets, gallery=True)`` for gallery products and
    ``update(embeddings, target_ids, datasets, gallery=False, source_ids=..., subsets=..., flags=...)``
    for queries. ``compute`` returns, for every K:

    - ``recall_at_{k}`` over all queries, ``{dataset}/recall_at_{k}``, ``mean_recall_at_{k}`` (the
      unweighted mean over datasets), and ``score``: the mean of ``mean_recall_at_{k}`` over
      ``score_k`` (FashionIQ: (R@10 + R@50) / 2; FashionMV: the average of R@5 and R@10);
    - the same under ``text_blind/`` (queries whose source product is in the gallery, embedded as a
      gallery product: what ignoring the text achieves) and ``chance/`` (K / gallery, per query),
      ``text_blind/score`` and ``chance/score`` included;
    - ``recall_subset_at_{1,2,3}`` and ``text_blind/recall_subset_at_*`` for queries with a group;
    - ``view_incomplete/recall_at_{k}`` and its text-blind line for queries flagged view-incomplete;
    - gallery and query counts per dataset.

    A gallery product seen twice (a DDP sampler padding, say) is counted once. After ``compute``,
    ``last_ranks`` holds per dataset the 0-based pessimistic ranks of the model's and the text-blind
    queries and the gallery size (for Recall@K curves); ranks are exact below max(top_k) on faiss.

    Args:
        dataset_names: index → name of the dataset indices passed to ``update``.
        top_k: the K values.
        score_k: the K values averaged into ``score``; default: all of ``top_k``.
        gallery_protocol: ``all``: every gallery product of the query's dataset; ``queries``: only
            products that are the source or target of some query of that dataset (FashionIQ's
            "VAL" protocol).
        remove_source: drop each query's own source product from its ranking.
        chunk_size: block size of the chunked exact search.
        backend: ``torch`` (exact rank counting), ``faiss`` (a flat index's top list) or ``auto``
            (faiss for single vectors on the CPU, torch on a GPU and for MaxSim; see ``resolve_backend``).
        label: what errors call this evaluation (the split).
    """

    full_state_update = False

    def __init__(self, dataset_names: Sequence[str] = ("default",), top_k: Sequence[int] = (1, 5, 10),
                 score_k: Sequence[int] | None = None, gallery_protocol: GalleryProtocol = "all",
                 remove_source: bool = False, chunk_size: int = 4096, backend: Backend = "torch",
                 label: str = "evaluation", **kwargs: object) -> None:
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
        self.label = label
        self.last_ranks: dict[str, dict[str, torch.Tensor | int]] = {}
        for name in ("gallery_emb", "gallery_ids", "gallery_ds", "query_emb", "query_ids", "query_src", "query_ds",
                     "query_subset", "query_flags"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, ids: torch.Tensor, datasets: torch.Tensor, gallery: bool,
               source_ids: torch.Tensor | None = None, subsets: torch.Tensor | None = None,
               flags: torch.Tensor | None = None) -> None:
        prefix = "gallery" if gallery else "query"
        getattr(self, f"{prefix}_emb").append(embeddings.detach().float())
        getattr(self, f"{prefix}_ids").append(ids.to(torch.long))
        getattr(self, f"{prefix}_ds").append(datasets.to(torch.long))
        if not gallery:
            n = len(ids)
            src = source_ids if source_ids is not None else torch.full_like(ids, -1)
            self.query_src.append(src.to(device=ids.device, dtype=torch.long))
            sub = torch.full((n, SUBSET_WIDTH), -1, dtype=torch.long, device=ids.device)
            if subsets is not None:
                sub[:, : subsets.shape[1]] = subsets.to(device=ids.device, dtype=torch.long)
            self.query_subset.append(sub)
            flag = flags if flags is not None else torch.zeros(n, dtype=torch.long)
            self.query_flags.append(flag.to(device=ids.device, dtype=torch.long))

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
        # Keyed on the full (dataset, id) pair: folding both into one integer would merge products.
        _, inverse = torch.unique(torch.stack([g_ds, g_ids], 1), dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(g_ids), dtype=torch.long, device=g_ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(g_ids), device=g_ids.device), reduce="amin")
        return g_emb[first], g_ids[first], g_ds[first]

    def _name(self, d: int) -> str:
        name = self.dataset_names[d] if d < len(self.dataset_names) else str(d)
        if name in REFERENCE_LINES or re.fullmatch(TURN_PATTERN, name):  # its keys would be read as a line's
            raise ValueError(f"a dataset named {name!r}: the names {list(REFERENCE_LINES)} and turn_<t> are reserved "
                             "for the evaluation's reference lines and session turns; rename the dataset")
        return name

    def _check_finite(self, emb: torch.Tensor, ds: torch.Tensor, kind: str) -> None:
        bad = ~finite_rows(emb)
        if bad.any():
            d = int(ds[bad][0])
            n_bad, n_all = int((bad & (ds == d)).sum()), int((ds == d).sum())
            raise NonFiniteEmbeddings(
                f"{self.label}: {n_bad} of {n_all} {kind} embeddings of dataset '{self._name(d)}' are NaN or infinite "
                f"({int(bad.sum())} in all datasets); no Recall@K is computed from them (check the model for a "
                "diverged loss or a bad checkpoint)")

    def compute(self) -> dict[str, torch.Tensor]:
        g_emb, g_ids, g_ds = self.gallery()
        q_emb, q_ids, q_src, q_ds = (self._cat(n) for n in ("query_emb", "query_ids", "query_src", "query_ds"))
        q_sub, q_flag = self._cat("query_subset"), self._cat("query_flags")
        if g_emb.numel() == 0 or q_emb.numel() == 0:
            raise RuntimeError("RecallAtK.compute() needs gallery and query embeddings; one of them is empty")
        self._check_finite(g_emb, g_ds, "gallery")
        self._check_finite(q_emb, q_ds, "query")
        out: dict[str, torch.Tensor] = {}
        pooled: dict[str, list[torch.Tensor]] = {}
        per_dataset: dict[str, list[torch.Tensor]] = {}
        self.last_ranks = {}

        def add(key: str, values: torch.Tensor, name: str | None = None) -> None:
            pooled.setdefault(key, []).append(values)
            if name is not None and len(values):  # a line with no query (no source in the gallery) is not 0
                out[f"{name}/{key}"] = values.float().mean()
                per_dataset.setdefault(key, []).append(out[f"{name}/{key}"])

        for d in torch.unique(q_ds).tolist():
            q_sel = q_ds == d
            g_sel = g_ds == d
            if self.gallery_protocol == "queries":
                g_sel &= torch.isin(g_ids, torch.cat([q_ids[q_sel], q_src[q_sel]]))
            name = self._name(d)
            r = self._dataset_ranks(q_emb[q_sel], q_ids[q_sel], q_src[q_sel], q_sub[q_sel], g_emb[g_sel], g_ids[g_sel])
            flags = q_flag[q_sel].bool()
            for k in self.top_k:
                add(f"recall_at_{k}", r["model"] < k, name)
                add(f"text_blind/recall_at_{k}", r["text_blind"][r["blind_ok"]] < k, name)
                chance = torch.where(r["pool"] > 0, (k / r["pool"].clamp(min=1)).clamp(max=1.0), 0.0)
                add(f"chance/recall_at_{k}", chance, name)
                add(f"view_incomplete/recall_at_{k}", r["model"][flags] < k)
                add(f"view_incomplete/text_blind/recall_at_{k}", r["text_blind"][flags & r["blind_ok"]] < k)
            for k in SUBSET_K:
                add(f"recall_subset_at_{k}", r["subset"][r["subset"] >= 0] < k)
                add(f"text_blind/recall_subset_at_{k}", r["subset_blind"][r["subset_blind"] >= 0] < k)
            out[f"{name}/gallery_size"] = torch.tensor(float(g_sel.sum()))
            out[f"{name}/queries"] = torch.tensor(float(q_sel.sum()))
            add("text_blind/queries", r["blind_ok"])
            add("subset/queries", r["subset"] >= 0)
            add("view_incomplete/queries", flags)
            self.last_ranks[name] = {"model": r["model"], "text_blind": r["text_blind"][r["blind_ok"]],
                                     "gallery_size": int(r["pool"].max()) if len(r["pool"]) else 0}
        for key, values in pooled.items():
            flat = torch.cat(values)
            if key.endswith("queries"):
                if key == "text_blind/queries" or flat.any():  # no subset or flag: the line does not exist
                    out[key] = flat.float().sum()
            elif len(flat):
                out[key] = flat.float().mean()
        for key, means in per_dataset.items():
            out[f"mean_{key}" if "/" not in key else f"{key.rsplit('/', 1)[0]}/mean_{key.rsplit('/', 1)[1]}"] = (
                torch.stack(means).mean())
        for prefix in ("", "text_blind/", "chance/"):
            parts = [out.get(f"{prefix}mean_recall_at_{k}") for k in self.score_k]
            if all(p is not None for p in parts):
                out[f"{prefix}score"] = torch.stack(parts).mean()
        return out

    def _ranks(self, queries: torch.Tensor, gallery: torch.Tensor, target_index: torch.Tensor,
               source_index: torch.Tensor | None) -> torch.Tensor:
        if resolve_backend(self.backend, queries) == "faiss":
            ranks = faiss_target_ranks(queries, gallery, target_index, max(self.top_k),
                                       exclude_index=source_index).to(target_index.device)
        else:
            ranks = target_ranks(queries, gallery, target_index, self.chunk_size, exclude_index=source_index)
        # An absent target is a miss at every K, even a K larger than the gallery.
        return torch.where(target_index >= 0, ranks, torch.full_like(ranks, MISS))

    def _dataset_ranks(self, queries: torch.Tensor, query_targets: torch.Tensor, query_sources: torch.Tensor,
                       query_subsets: torch.Tensor, gallery: torch.Tensor,
                       gallery_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        n, device = len(queries), queries.device
        missing = torch.full((n,), MISS, dtype=torch.long, device=device)
        none = torch.full((n,), -1, dtype=torch.long, device=device)
        if gallery.shape[0] == 0:  # nothing of this dataset was evaluated (limit_val_batches, say)
            return {"model": missing, "text_blind": missing,
                    "blind_ok": torch.zeros(n, dtype=torch.bool, device=device), "pool": torch.zeros(n, device=device),
                    "subset": none, "subset_blind": none}
        order = torch.argsort(gallery_ids)  # sorted once, searched for targets, sources and groups
        sorted_ids = gallery_ids[order]

        def index_of(wanted: torch.Tensor) -> torch.Tensor:
            pos = torch.searchsorted(sorted_ids, wanted.contiguous()).clamp(max=len(sorted_ids) - 1)
            found = (sorted_ids[pos] == wanted) & (wanted >= 0)
            return torch.where(found, order[pos], torch.full_like(pos, -1))

        target_index = index_of(query_targets)
        source_index = index_of(query_sources)
        removed = source_index if self.remove_source else None
        if self.remove_source:
            target_index[query_targets == query_sources] = -1  # a removed source cannot be the answer
        pool = torch.full((n,), float(len(gallery_ids)), device=device)
        if self.remove_source:
            pool -= (source_index >= 0).float()
        model = self._ranks(queries, gallery, target_index, removed)
        blind_ok = source_index >= 0
        blind_all = missing.clone()
        if blind_ok.any():
            blind_all[blind_ok] = self._ranks(gallery[source_index[blind_ok]], gallery, target_index[blind_ok],
                                              removed[blind_ok] if removed is not None else None)
        members = index_of(query_subsets.reshape(-1)).reshape(query_subsets.shape)
        members[members == source_index[:, None]] = -1
        subset_blind = none.clone()
        if blind_ok.any():
            subset_blind[blind_ok] = subset_ranks(gallery[source_index[blind_ok]], gallery, target_index[blind_ok],
                                                  members[blind_ok])
        return {"model": model, "text_blind": blind_all, "blind_ok": blind_ok,
                "pool": pool, "subset": subset_ranks(queries, gallery, target_index, members),
                "subset_blind": subset_blind}


def subset_ranks(queries: torch.Tensor, gallery: torch.Tensor, target_index: torch.Tensor,
                 members: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based rank of each target among its group ``members`` (gallery indices, -1
    padding; the target is always scored even if the group omits it); -1 for queries with no group
    or whose target is not in the gallery."""
    has_group = (members >= 0).any(1) & (target_index >= 0)
    ranks = torch.full((len(queries),), -1, dtype=torch.long, device=queries.device)
    if not has_group.any():
        return ranks
    q, t, m = queries[has_group], target_index[has_group], members[has_group]
    m = torch.where(m == t[:, None], torch.full_like(m, -1), m)  # the target is column 0 below
    cols = torch.cat([t[:, None], m], 1)
    if q.ndim == 2:
        scores = torch.einsum("nd,nwd->nw", q, gallery[cols.clamp(min=0)])
    else:  # MaxSim: one small block per query
        scores = torch.stack([similarities(qi[None], gallery[ci.clamp(min=0)])[0] for qi, ci in zip(q, cols,
                                                                                                   strict=True)])
    at_least = (scores[:, 1:] >= scores[:, :1]) & (cols[:, 1:] >= 0)
    ranks[has_group] = at_least.sum(1)
    return ranks
