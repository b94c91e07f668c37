"""The model side of ``cir serve``: embed query batches and search each dataset's gallery.

A query is a source (views from the gallery or uploaded) plus a modification text. Every family
runs its ``encode_query`` on a padded batch of queries, built exactly as the DataModule builds an
evaluation batch. ProCIR with the two-stage dialogue instead keeps turn 1 of each source in a KV
cache (``BytesLRU``): a user refining the same source pays only for turn 2 (the text). Turn 2 runs
one query at a time: queries of different sources continue caches of different lengths, which a
batch would have to pad inside the recurrent (Gated DeltaNet) state.

Turns of a multi-turn session (``SessionJob``) of such a model run on the same worker, one at a
time: each continues the session's previous state (``SessionEncoder``), which is never changed, so
the session store can hand it to the worker without a lock. Products written while serving
(``ProductJob``) are embedded by the same worker, batched with the queries, through the model's
target encoder. The model and its batches are on ``device``, under autocast when ``dtype`` is bf16;
embeddings leave as float32 CPU rows, which the store keeps.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image

from datamodules.batching import collate, pad_views, stack_views
from datamodules.interfaces import RetrievalData
from lightning_modules.core import Retriever
from lightning_modules.core.embedding import autocast_for, embed_product_batch, embed_products, embed_query_batch
from lightning_modules.families.procir import InteractiveEncoder, ProCIR, SourceCache
from lightning_modules.families.procir.session_cache import SessionEncoder, SessionState
from lightning_modules.retrieval import GalleryIndex, topk

from ..models import command_name
from ..progress import Progress
from .gallery import GalleryStore
from .lru import BytesLRU
from .products import Products


@dataclass
class Query:
    dataset: str
    text: str
    k: int
    views: list[Image.Image]
    source_key: Hashable | None = None  # where turn 1 may be cached: ("gallery", dataset, id, version) or a digest
    source_caption: str = ""


@dataclass
class ProductJob:
    """A product to embed as a gallery item (a write): its views and the metadata its model reads."""

    views: list[Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SessionJob:
    """One turn of a KV-cached session: the state after the previous turn (None: turn 1), the text,
    and the views of the reference this turn brings (turn 1's start product, a clicked result)."""

    dataset: str
    k: int
    text: str
    views: list[Image.Image] | None
    state: SessionState | None = None


@dataclass
class Answer:
    results: list[tuple[str, float]]
    encode_ms: float
    cached: bool = False
    batch_size: int = 1
    state: SessionState | None = None  # a session turn's new state


class Gallery:
    """A gallery held in memory (``ProductStore``, read-only): a faiss index for single vectors,
    exact MaxSim (``retrieval.topk``) for multi-vector targets, which faiss cannot score."""

    def __init__(self, index: GalleryIndex | None = None, multi: dict[str, tuple[torch.Tensor, list[str]]] | None
                 = None) -> None:
        self.index, self.multi = index, multi or {}
        self.fingerprint = index.fingerprint if index is not None else None
        self._sets = {d: set(ids) for d, ids in self._ids().items()}

    @classmethod
    def from_embeddings(cls, emb: torch.Tensor, ids: list[str], datasets: list[str]) -> Gallery:
        if emb.ndim == 2:
            return cls(index=GalleryIndex.build(emb, ids, datasets))
        multi = {}
        for d in sorted(set(datasets)):
            rows = [i for i, x in enumerate(datasets) if x == d]
            multi[d] = (emb[rows], [ids[i] for i in rows])
        return cls(multi=multi)

    def _ids(self) -> dict[str, list[str]]:
        return dict(self.index.ids) if self.index is not None else {d: ids for d, (_, ids) in self.multi.items()}

    def datasets(self) -> list[str]:
        return sorted(self._sets)

    def count(self, dataset: str) -> int:
        return len(self._sets.get(dataset, ()))

    def ids(self, dataset: str) -> list[str]:
        return self._ids().get(dataset, [])

    def contains(self, dataset: str, pid: str) -> bool:
        return pid in self._sets.get(dataset, ())

    def search(self, queries: torch.Tensor, k: int, dataset: str | None = None,
               where: Mapping[str, str] | None = None) -> list[list[tuple[str, float]]]:
        if where:
            raise ValueError("this gallery keeps no product metadata to filter on")
        if self.index is not None:
            return self.index.search(queries, k, dataset=dataset)
        emb, ids = self.multi[dataset or next(iter(self.multi))]
        scores, idx = topk(queries.float(), emb, k, backend="torch")
        return [[(ids[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)]
                for row_s, row_i in zip(scores, idx, strict=True)]


def embed_jobs(model: Retriever, transform: Any, device: torch.device, dtype: torch.dtype,
               jobs: list[ProductJob]) -> list[torch.Tensor | BaseException]:
    """Each product's float32 CPU embedding (``[D]``, or ``[V, D]`` for a multi-vector model) from
    its views, in one padded batch as a gallery batch is built; a product whose views cannot be
    transformed gets its own exception."""
    out: list[torch.Tensor | BaseException | None] = [None] * len(jobs)
    stacks, rows = [], []
    for i, job in enumerate(jobs):
        try:
            stacks.append(stack_views(job.views, transform))
            rows.append(i)
        except Exception as error:  # noqa: BLE001 - reported to this request's client only
            out[i] = error
    if stacks:
        images, mask = pad_views(stacks)
        batch = {"images": images, "mask": mask, "meta": [jobs[i].meta for i in rows]}
        try:
            with torch.no_grad(), autocast_for(device, dtype):
                emb = embed_product_batch(model, move_data_to_device(batch, device)).float().cpu()
            for i, e in zip(rows, emb, strict=True):
                out[i] = e
        except Exception as error:  # noqa: BLE001 - every job of the batch gets the model's fault
            for i in rows:
                out[i] = error
    return [o for o in out if o is not None]


class SearchEngine:
    """Holds the model, its gallery (any ``ProductStore``), the products' photos and (ProCIR) the
    turn-1 cache; ``run`` answers a batch of queries and product jobs."""

    def __init__(self, model: Retriever, dm: RetrievalData, split: str = "val", gallery: Any = None,
                 cache_mb: float = 512.0, *, products: Products | None = None, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self.dm, self.split = model, dm, split
        self.device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        self.dtype = dtype
        embedded = gallery is None
        if gallery is None:
            manifest = getattr(dm, "manifest", None)
            total = manifest.get("splits", {}).get(split, {}).get("products") if isinstance(manifest, dict) else None
            with Progress(command_name() or "cir", f"embedding the {split} gallery", total, "product") as progress:
                out = embed_products(model, dm.eval_dataloaders(split)[0], self.device, dtype, progress)
            gallery = Gallery.from_embeddings(out.embeddings, out.raw_ids, out.datasets)
        elif isinstance(gallery, GalleryIndex):
            gallery = Gallery(index=gallery)
        self.gallery = gallery
        self.store = products or Products(gallery, GalleryStore(dm.data_dir, split, dm.captions))
        if not embedded:
            self._check_ids()
        self.interactive: InteractiveEncoder | None = None
        # The cache holds turn 1 of all views in one dialogue: the "joint" way to embed a source.
        if isinstance(model, ProCIR) and model.two_stage_dialogue and model.view_strategy == "joint" and cache_mb > 0:
            self.interactive = InteractiveEncoder(model)
        self.cache: BytesLRU[SourceCache] = BytesLRU(int(cache_mb * 2**20))
        # Sessions continue one dialogue turn by turn where turn 1 can be cached: the same condition.
        self.sessions: SessionEncoder | None = None
        if isinstance(model, ProCIR) and model.two_stage_dialogue and model.view_strategy == "joint":
            self.sessions = self.interactive or InteractiveEncoder(model)
        # One product embedded in this (the main) thread before the worker thread runs the model: on
        # the CPU, torch's parallel regions started first from another thread ran 2-3x slower for the
        # life of the process (measured: 14-18 against 5-8 ms per batch of 8 CLIP4CIR queries).
        warm = embed_jobs(model, dm.image_transform, self.device, dtype,
                          [ProductJob([Image.new("RGB", (64, 64), (128, 128, 128))])])[0]
        if isinstance(warm, BaseException):
            raise warm
        self.product_shape = tuple(warm.shape)  # what a write gives the store: [D], or [V, D] (multi-vector)

    def _check_ids(self) -> None:
        """Every product of a given gallery (but those uploaded while serving) has photos in the
        base: an index of other data is refused at start-up, not found out per query."""
        listed = getattr(self.gallery, "ids", None)
        base = self.store.base
        if not callable(listed) or base is None:
            return
        uploads = self.store.uploads
        problems = []
        for dataset in self.gallery.datasets():
            ids = [i for i in listed(dataset) if uploads is None or not uploads.has(dataset, i)]
            missing = [i for i in ids if not base.has(dataset, i)]
            if missing:
                where = (f"the {self.split} gallery shards of {self.dm.data_dir}" if isinstance(base, GalleryStore)
                         else f"catalogue {base.root}")
                problems.append(f"{dataset}: {len(missing)} of {len(ids)} indexed ids (e.g. {missing[0]!r}) are not "
                                f"in {where}")
        if problems:
            hint = (f"build it from this data and split (cir search build ... --split {self.split}) or serve without "
                    "--index" if isinstance(base, GalleryStore) else "index this catalogue again (cir index)")
            raise SystemExit("the index does not match the data: " + "; ".join(problems) + f"; {hint}")

    @property
    def datasets(self) -> list[str]:
        return list(self.gallery.datasets())

    def gallery_size(self, dataset: str) -> int:
        return int(self.gallery.count(dataset))

    @property
    def caches_turn1(self) -> bool:
        return self.interactive is not None

    def _search(self, query: torch.Tensor, k: int, dataset: str) -> list[tuple[str, float]]:
        try:
            return self.gallery.search(query[None].float().cpu(), k, dataset=dataset)[0]
        except KeyError:  # its last product was deleted after the request was checked
            return []

    @torch.no_grad()
    def run(self, items: Sequence[Query | ProductJob | SessionJob]) -> list[Answer | torch.Tensor | BaseException]:
        """One answer per item (a query's results, a product's float32 CPU embedding), or the
        exception of that item alone: a view that fails to decode must not fail the rest of its batch."""
        out: list[Any] = [None] * len(items)
        jobs = [i for i, item in enumerate(items) if isinstance(item, ProductJob)]
        if jobs:
            for i, emb in zip(jobs, self._embed_products([items[i] for i in jobs]), strict=True):
                out[i] = emb
        queries = [i for i, item in enumerate(items) if isinstance(item, Query)]
        if queries:
            for i, answer in zip(queries, self._answer([items[i] for i in queries]), strict=True):
                out[i] = answer
        for i, item in enumerate(items):
            if isinstance(item, SessionJob):
                out[i] = self._session_turn(item)
        return out

    def _embed_products(self, jobs: list[ProductJob]) -> list[torch.Tensor | BaseException]:
        return embed_jobs(self.model, self.dm.image_transform, self.device, self.dtype, jobs)

    def _answer(self, queries: list[Query]) -> list[Answer | BaseException]:
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
            with autocast_for(self.device, self.dtype):
                emb = embed_query_batch(self.model, move_data_to_device(collate(examples), self.device)).float().cpu()
            ms = 1000 * (time.perf_counter() - t0) / len(examples)
            for i, e in zip(rows, emb, strict=True):
                q = queries[i]
                out[i] = Answer(self._search(e, q.k, q.dataset), ms, batch_size=len(examples))
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
        with autocast_for(self.device, self.dtype):
            if cache is None:
                cache = self.interactive.cache_source(q.views)
                if q.source_key is not None:
                    self.cache.put(q.source_key, cache)
            emb = self.interactive.encode_query(None, q.text, cache=cache)
        ms = 1000 * (time.perf_counter() - t0)
        return Answer(self._search(emb.float().cpu(), q.k, q.dataset), ms, cached=hit)

    def _session_turn(self, job: SessionJob) -> Answer | BaseException:
        """Turn 1 (``job.state`` None) or the next turn of a KV-cached session; its own error only."""
        t0 = time.perf_counter()
        try:
            if self.sessions is None:
                raise RuntimeError(f"{type(self.model).__name__} has no KV-cached sessions; ask the joined-text way")
            with autocast_for(self.device, self.dtype):
                if job.state is None:
                    q, state = self.sessions.start_session(job.views or [], job.text)
                else:
                    q, state = self.sessions.extend(job.state, job.text, job.views)
            ms = 1000 * (time.perf_counter() - t0)
            return Answer(self._search(q.float().cpu(), job.k, job.dataset), ms, cached=job.state is not None,
                          state=state)
        except Exception as error:  # noqa: BLE001 - reported to this turn's client only
            return error
