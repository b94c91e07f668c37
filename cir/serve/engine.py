"""The model side of ``cir serve``: embed query batches and search each dataset's gallery.

A query is a source (views from the gallery or uploaded) plus a modification text. Every family
runs its ``encode_query`` on a padded batch of queries, built exactly as the DataModule builds an
evaluation batch. ProCIR with the two-stage dialogue instead keeps turn 1 of each source in a KV
cache (``BytesLRU``): a user refining the same source pays only for turn 2 (the text). Turn 2 runs
one query at a time: queries of different sources continue caches of different lengths, which a
batch would have to pad inside the recurrent (Gated DeltaNet) state.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from datamodules.batching import collate, stack_views
from datamodules.interfaces import RetrievalData
from lightning_modules.core import Retriever
from lightning_modules.families.procir import InteractiveEncoder, ProCIR, SourceCache
from lightning_modules.retrieval import GalleryIndex, topk

from ..models import encode_gallery
from .gallery import GalleryStore
from .lru import BytesLRU


@dataclass
class Query:
    dataset: str
    text: str
    k: int
    views: list[Image.Image]
    source_key: Hashable | None = None  # where turn 1 may be cached: ("gallery", dataset, id) or an upload digest
    source_caption: str = ""


@dataclass
class Answer:
    results: list[tuple[str, float]]
    encode_ms: float
    cached: bool = False
    batch_size: int = 1


class Gallery:
    """Per-dataset search over product embeddings: a faiss index for single vectors, exact MaxSim
    (``retrieval.topk``) for multi-vector targets, which faiss cannot score."""

    def __init__(self, index: GalleryIndex | None = None, multi: dict[str, tuple[torch.Tensor, list[str]]] | None
                 = None) -> None:
        self.index, self.multi = index, multi or {}

    @classmethod
    def from_embeddings(cls, emb: torch.Tensor, ids: list[str], datasets: list[str]) -> Gallery:
        if emb.ndim == 2:
            return cls(index=GalleryIndex.build(emb, ids, datasets))
        multi = {}
        for d in sorted(set(datasets)):
            rows = [i for i, x in enumerate(datasets) if x == d]
            multi[d] = (emb[rows], [ids[i] for i in rows])
        return cls(multi=multi)

    def ids(self) -> dict[str, list[str]]:
        return dict(self.index.ids) if self.index is not None else {d: ids for d, (_, ids) in self.multi.items()}

    def search(self, queries: torch.Tensor, k: int, dataset: str) -> list[list[tuple[str, float]]]:
        if self.index is not None:
            return self.index.search(queries, k, dataset=dataset)
        emb, ids = self.multi[dataset]
        scores, idx = topk(queries.float(), emb, k, backend="torch")
        return [[(ids[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)]
                for row_s, row_i in zip(scores, idx, strict=True)]


class SearchEngine:
    """Holds the model, its gallery and (ProCIR) the turn-1 cache; ``run`` answers a batch."""

    def __init__(self, model: Retriever, dm: RetrievalData, split: str = "val", index: GalleryIndex | None = None,
                 cache_mb: float = 512.0) -> None:
        self.model, self.dm, self.split = model, dm, split
        self.store = GalleryStore(dm.data_dir, split, dm.captions)
        if index is None:
            emb, ids, datasets = encode_gallery(model, dm, split)
            self.gallery = Gallery.from_embeddings(emb, ids, datasets)
        else:
            self.gallery = Gallery(index=index)
        self._check_ids()
        # The gallery never changes while serving: its datasets and sizes are read once, not per request.
        self.sizes = {d: len(ids) for d, ids in sorted(self.gallery.ids().items())}
        self.interactive: InteractiveEncoder | None = None
        # The cache holds turn 1 of all views in one dialogue: the "joint" way to embed a source.
        if isinstance(model, ProCIR) and model.two_stage_dialogue and model.view_strategy == "joint" and cache_mb > 0:
            self.interactive = InteractiveEncoder(model)
        self.cache: BytesLRU[SourceCache] = BytesLRU(int(cache_mb * 2**20))

    def _check_ids(self) -> None:
        problems = []
        for dataset, ids in self.gallery.ids().items():
            missing = [i for i in ids if not self.store.has(dataset, i)]
            if missing:
                problems.append(f"{dataset}: {len(missing)} of {len(ids)} indexed ids (e.g. {missing[0]!r}) are not "
                                f"in the {self.split} gallery shards of {self.dm.data_dir}")
        if problems:
            raise SystemExit("the index does not match the data: " + "; ".join(problems) +
                             "; build it from this data and split (cir search build ... --split "
                             f"{self.split}) or serve without --index")

    @property
    def datasets(self) -> list[str]:
        return list(self.sizes)

    def gallery_size(self, dataset: str) -> int:
        return self.sizes[dataset]

    @property
    def caches_turn1(self) -> bool:
        return self.interactive is not None

    @torch.no_grad()
    def run(self, queries: Sequence[Query]) -> list[Answer | BaseException]:
        """One answer per query, or the exception of that query alone: a view that fails to decode
        must not fail the other queries of its batch."""
        t0 = time.perf_counter()
        if self.interactive is not None:
            return [self._run_cached(q) for q in queries]
        out: list[Answer | BaseException | None] = [None] * len(queries)
        examples, rows = [], []
        for i, q in enumerate(queries):
            try:
                examples.append({"source_images": stack_views(q.views, self.dm.image_transform), "text": q.text,
                                 "source_caption": q.source_caption})
                rows.append(i)
            except Exception as error:  # noqa: BLE001 - reported to this query's client only
                out[i] = error
        if examples:
            emb = self.model.encode_query(collate(examples)).float()
            ms = 1000 * (time.perf_counter() - t0) / len(examples)
            for i, e in zip(rows, emb, strict=True):
                q = queries[i]
                out[i] = Answer(self.gallery.search(e[None], q.k, q.dataset)[0], ms, batch_size=len(examples))
        return [a for a in out if a is not None]

    def _run_cached(self, q: Query) -> Answer | BaseException:
        try:
            return self._cached_answer(q)
        except Exception as error:  # noqa: BLE001 - reported to this query's client only
            return error

    def _cached_answer(self, q: Query) -> Answer:
        assert self.interactive is not None
        t0 = time.perf_counter()
        cache = self.cache.get(q.source_key) if q.source_key is not None else None
        hit = cache is not None
        if cache is None:
            cache = self.interactive.cache_source(q.views)
            if q.source_key is not None:
                self.cache.put(q.source_key, cache)
        emb = self.interactive.encode_query(None, q.text, cache=cache)
        ms = 1000 * (time.perf_counter() - t0)
        return Answer(self.gallery.search(emb[None], q.k, q.dataset)[0], ms, cached=hit)
