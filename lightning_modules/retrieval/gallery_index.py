"""A saved, searchable gallery: one faiss index per dataset, exact or approximate.

``kind`` is a preset or a faiss factory string (``ann.py``): ``flat`` is exact inner-product search
(embeddings are unit vectors, so cosine); ``ivf`` (inverted lists, ``nprobe`` of ``nlist`` cells
searched), ``hnsw`` (graph search, ``ef_search``) and ``ivfpq`` (OPQ + IVF + 4-dimensions-per-byte
codes) trade recall for speed and memory; ``benchmarks/ann.py`` measures the trade.

Options of ``build``:

- ``store_vectors``: the float vectors are kept beside the index (a ``.npy`` per dataset, mapped
  from disk on load, so they cost disk and page cache rather than memory), and ``rerank=R``
  re-scores the top ``R`` candidates exactly by inner product, which restores what codes lose.
- ``on_disk``: an IVF index is loaded with its inverted lists mapped from the index file (faiss
  ``OnDiskInvertedLists`` over the file), so a search reads only the lists it probes: an index
  larger than memory is searched without reading it in.
- ``[N, V, D]`` embeddings (several views per product; all-zero rows or ``mask`` False for absent
  views): each present view vector is indexed with its product's row; a search asks faiss for
  ``max(k, rerank) * V_max`` vectors per query vector (``V_max``: the most views a product has),
  which always holds ``max(k, rerank)`` distinct products, groups them by product and re-ranks them
  exactly by MaxSim (the best query-vector x view inner product) over the stored vectors. With a
  flat index this is exact MaxSim search.

Query knobs (``nprobe``, ``ef_search``, ``rerank``) are per call, with defaults stored in the index
(``configure``). An index also keeps the fingerprint of the model that embedded it
(``fingerprint``: written by ``cir search build``), so a query embedded by another model can be
refused; indexes saved before fingerprints were recorded load with ``fingerprint = None``.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from datamodules.atomic import fsync_path, write_json_atomic

from .ann import (
    IndexKind,
    as_f32,
    build_faiss_index,
    factory_for,
    find_hnsw,
    find_ivf,
    parse_factory,
    search_parameters,
    set_defaults,
)

__all__ = ["GalleryIndex", "IndexKind", "build_faiss_index"]

Hit = tuple[str, float]
RERANK_CHUNK = 32  # queries re-scored at once: their candidates' rows stay in cache (measured 2x faster than 256)

# The files a save writes (``000.faiss`` before names carried a token).
_OWN_FILE = re.compile(r"\d{3}(-[0-9a-f]{8})?\.faiss|\d{3}-[0-9a-f]{8}(\.rows)?\.npy")
_FILE_KEYS = ("file", "vectors", "rows")


def _files_named(meta_path: Path) -> set[str]:
    """The files the index at ``meta_path`` names (none when it is missing or unreadable)."""
    try:
        meta = json.loads(meta_path.read_text())
        return {str(entry[key]) for entry in meta["datasets"].values() for key in _FILE_KEYS if key in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _map_npy(path: Path) -> np.ndarray:
    """A read-only view of a saved ``.npy``, mapped from disk for random reads: re-ranking touches
    a few rows per query, and the kernel's default read-ahead reads far more around each. Measured
    on a 1M x 512 file (2 GB) evicted from the page cache: 1,000 queries re-ranking 100 candidates
    each read 425 MB from disk instead of all 2 GB. The price is a slower first pass over a cold
    file (197 against 712 queries/s here: 4 KB random reads); once the rows are cached, the same."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: not a vector file written by GalleryIndex.save; rebuild the index")
        offset = f.tell()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def _present(vectors: np.ndarray) -> np.ndarray:
    """Rows that hold a vector: finite and not all zero (padding is either)."""
    return np.isfinite(vectors).all(-1) & (vectors != 0).any(-1)


class GalleryIndex:
    """Per-dataset faiss indexes over product embeddings, with the products' ids (a ``ProductStore``)."""

    def __init__(self, kind: IndexKind | str = "flat", fingerprint: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.indexes: dict[str, faiss.Index] = {}
        self.ids: dict[str, list[str]] = {}
        self.fingerprint = fingerprint  # the embedding model's identity; None: not recorded (an old index)
        self.factories: dict[str, str] = {}  # the faiss string each dataset's index was built from
        self.stored: dict[str, np.ndarray] = {}  # [N, D] or [N, V, D] float vectors kept for re-ranking
        self.rows: dict[str, np.ndarray] = {}  # multi-vector: index row -> product * V + view
        self.on_disk: set[str] = set()  # datasets whose inverted lists are mapped from the file on load
        self.defaults: dict[str, int] = {}  # nprobe / ef_search / rerank set by ``configure``
        self._views: dict[str, int] = {}  # multi-vector: the most views a product of the dataset has
        self._mapped: dict[str, Path] = {}  # the file a loaded on-disk index is mapped from

    @classmethod
    def build(cls, embeddings: Any, ids: Sequence[str], datasets: Sequence[str], kind: IndexKind | str = "flat",
              fingerprint: dict[str, str] | None = None, *, mask: Any = None, store_vectors: bool = False,
              rerank: int = 0, on_disk: bool = False, **options: Any) -> GalleryIndex:
        """``embeddings`` ``[N, D]``, or ``[N, V, D]`` multi-vector (``mask`` ``[N, V]``: present
        views; by default the rows neither all zero nor NaN). ``options``: ``build_faiss_index``'s."""
        vectors = as_f32(embeddings)
        if vectors.ndim not in (2, 3) or not len(vectors) == len(ids) == len(datasets):
            raise ValueError(f"embeddings {tuple(vectors.shape)} for {len(ids)} ids and {len(datasets)} datasets: "
                             "give [N, D] or [N, V, D] with N ids and N dataset names")
        multi = vectors.ndim == 3
        if multi:
            present = _present(vectors) & (np.ones(vectors.shape[:2], bool) if mask is None else as_mask(mask))
            vectors = np.where(present[..., None], np.nan_to_num(vectors), np.float32(0))
        if rerank and not (store_vectors or multi):
            raise ValueError(f"rerank={rerank} re-scores with the stored vectors: build with store_vectors=True")
        if on_disk:
            probe = parse_factory(_factory(kind, max(1, len(vectors)), vectors.shape[-1], options), vectors.shape[-1])
            if find_ivf(probe) is None:
                raise ValueError(f"on_disk: kind {kind!r} has no inverted lists to map; use an IVF kind (ivf, "
                                 "ivfpq, an 'IVF...' factory string)")
        out = cls(kind, fingerprint)
        names = np.asarray(datasets, dtype=object)
        for dataset in sorted(set(datasets)):
            rows = np.flatnonzero(names == dataset)
            out.ids[dataset] = [ids[i] for i in rows]
            own = vectors if len(rows) == len(vectors) else vectors[rows]  # a copy only where it selects
            if multi:
                flat_rows = np.flatnonzero(present[rows].reshape(-1))
                counts = np.bincount(flat_rows // own.shape[1], minlength=len(rows))
                if not counts.all():
                    raise ValueError(f"product {out.ids[dataset][int(np.argmin(counts))]!r} of {dataset!r} has no "
                                     "view vector (all rows zero, NaN or masked): leave it out")
                out.rows[dataset], out._views[dataset] = flat_rows, int(counts.max())
                indexed = own.reshape(-1, own.shape[-1])[flat_rows]
            else:
                indexed = own
            try:
                out.indexes[dataset] = build_faiss_index(indexed, kind, **options)
            except ValueError as exc:
                raise ValueError(f"dataset {dataset!r}: {exc}") from None
            out.factories[dataset] = _factory(kind, len(indexed), own.shape[-1], options)
            if store_vectors or multi:  # never the caller's memory: a later change there must not reach the index
                out.stored[dataset] = own.copy() if _shares(own, embeddings) else own
            if on_disk:
                out.on_disk.add(dataset)
        if rerank:
            out.defaults["rerank"] = rerank
        return out

    # -- the ProductStore protocol -------------------------------------------------------------

    def datasets(self) -> list[str]:
        return sorted(self.indexes)

    def count(self, dataset: str) -> int:
        return len(self.ids[self._dataset(dataset)])

    def search(self, queries: Any, k: int, dataset: str | None = None, where: Mapping[str, str] | None = None,
               *, nprobe: int | None = None, ef_search: int | None = None,
               rerank: int | None = None) -> list[list[Hit]]:
        """Top-``k`` (id, score) per query in ``dataset``'s gallery (the only one when None).
        ``queries``: ``[Q, D]``, or ``[Q, W, D]`` multi-vector queries scored by MaxSim. ``nprobe``,
        ``ef_search``, ``rerank``: this call's knobs (None: the index's defaults)."""
        if where:
            raise ValueError(f"where={dict(where)}: a GalleryIndex keeps no product metadata to filter on; "
                             "filter its hits, or use a store that keeps metadata")
        dataset = self._dataset(dataset)
        index, q = self.indexes[dataset], as_f32(queries)
        if q.ndim not in (2, 3) or q.shape[-1] != index.d:
            raise ValueError(f"queries of shape {tuple(q.shape)}: the index of {dataset!r} holds {index.d}-d "
                             "vectors ([Q, D] or [Q, W, D] queries)")
        rerank = self.defaults.get("rerank", 0) if rerank is None else rerank
        if rerank and dataset not in self.stored:
            raise ValueError(f"rerank={rerank}: the index of {dataset!r} keeps no vectors to re-score with; "
                             "build it with store_vectors=True")
        keep: list[Any] = []
        params = search_parameters(index, nprobe, ef_search, keep)
        names = self.ids[dataset]
        if q.ndim == 2 and dataset not in self.rows:
            scores, idx = index.search(q, max(k, rerank), params=params)
            if rerank:
                scores, idx = _rescore(self.stored[dataset], q, idx, k)
            return [[(names[i], float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
                    for row_i, row_s in zip(idx, scores, strict=True)]
        return self._search_multi(dataset, q if q.ndim == 3 else q[:, None], k, max(k, rerank), params)

    # -- multi-vector search -------------------------------------------------------------------

    def _search_multi(self, dataset: str, q: np.ndarray, k: int, depth: int,
                      params: faiss.SearchParameters | None) -> list[list[Hit]]:
        """MaxSim search: candidates from faiss for every query vector, grouped by product, then
        scored exactly over the stored vectors (or, for a single-vector index without them, by the
        best score faiss gave each product)."""
        index, names = self.indexes[dataset], self.ids[dataset]
        rows, stored = self.rows.get(dataset), self.stored.get(dataset)
        views = self._views.get(dataset, 1)
        present = _present(q)
        flat = np.ascontiguousarray(q[present])
        owner = np.nonzero(present)[0]
        fetch = max(1, min(depth * views, index.ntotal))
        if len(flat):
            scores, idx = index.search(flat, fetch, params=params)
        else:
            scores, idx = np.zeros((0, fetch), np.float32), np.zeros((0, fetch), np.int64)
        products = idx if rows is None else np.where(idx >= 0, rows[np.maximum(idx, 0)] // stored.shape[1], -1)
        out: list[list[Hit]] = []
        bounds = np.searchsorted(owner, np.arange(len(q) + 1))
        for i in range(len(q)):
            cand, approx = products[bounds[i]:bounds[i + 1]].ravel(), scores[bounds[i]:bounds[i + 1]].ravel()
            keep = cand >= 0
            cand, approx = cand[keep], approx[keep]
            if stored is None:  # the best faiss score per product: exact for the pairs faiss returned
                order = np.lexsort((-approx, cand))
                cand, approx = cand[order], approx[order]
                first = np.r_[True, cand[1:] != cand[:-1]]
                cand, best = cand[first], approx[first]
            else:
                cand = np.unique(cand)
                best = maxsim_scores(stored, cand, q[i][present[i]])
            top = np.lexsort((cand, -best))[:k]
            out.append([(names[int(c)], float(s)) for c, s in zip(cand[top], best[top], strict=True)])
        return out

    # -- defaults, vectors ---------------------------------------------------------------------

    def configure(self, nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None) -> None:
        """Default query knobs, saved with the index; a knob no dataset's index has is refused."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is None:
                continue
            has = find_ivf if name == "nprobe" else find_hnsw
            targets = [d for d, index in self.indexes.items() if has(index) is not None]
            if not targets:
                raise ValueError(f"{name}={value}: no dataset's index ({self.kind}) has "
                                 f"{'inverted lists' if name == 'nprobe' else 'an HNSW graph'}")
            for d in targets:
                set_defaults(self.indexes[d], **{name: value})
            self.defaults[name] = value
        if rerank is not None:
            if rerank and set(self.indexes) - set(self.stored):
                raise ValueError(f"rerank={rerank}: this index keeps no vectors for "
                                 f"{sorted(set(self.indexes) - set(self.stored))}; build it with store_vectors=True")
            self.defaults["rerank"] = rerank

    def vectors(self, dataset: str) -> np.ndarray:
        """``dataset``'s vectors in ``ids`` order: the stored ones (``[N, D]``, or ``[N, V, D]`` with
        zero rows for absent views; read-only, mapped, after a load), else reconstructed by faiss,
        exact for flat, HNSW and IVF-Flat indexes, approximate for quantised codes (PQ, SQ)."""
        dataset = self._dataset(dataset)
        if dataset in self.stored:
            return self.stored[dataset]
        index = self.indexes[dataset]
        ivf = find_ivf(index)
        if ivf is None or ivf.direct_map.type != faiss.DirectMap.NoMap:
            return index.reconstruct_n(0, index.ntotal)
        ivf.make_direct_map()  # id -> list position, which reconstruction needs; dropped after
        try:
            return index.reconstruct_n(0, index.ntotal)
        finally:
            ivf.make_direct_map(False)

    def _dataset(self, dataset: str | None) -> str:
        if dataset is None:
            if len(self.indexes) != 1:
                raise ValueError(f"this index holds datasets {sorted(self.indexes)}: name one with dataset=")
            return next(iter(self.indexes))
        if dataset not in self.indexes:
            raise KeyError(f"no gallery for dataset {dataset!r}; the index holds {sorted(self.indexes)}")
        return dataset

    # -- save / load ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Into ``folder``, replacing an index there only once the new one is whole: the faiss and
        vector files get names of their own (synced to disk), ``gallery_index.json`` (which names
        them) is renamed into place last, and only then are the files of the old index removed. A
        kill at any moment leaves the old index or the new one, never a mixture."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        previous = _files_named(folder / "gallery_index.json")
        meta: dict[str, Any] = {"kind": self.kind, "datasets": {}}
        if self.fingerprint is not None:
            meta["fingerprint"] = dict(self.fingerprint)
        if self.defaults:
            meta["search"] = dict(self.defaults)
        token = uuid.uuid4().hex[:8]
        written: dict[str, Path] = {}
        for n, dataset in enumerate(sorted(self.indexes)):
            entry: dict[str, Any] = {"file": f"{n:03d}-{token}.faiss", "ids": self.ids[dataset]}
            path = folder / entry["file"]
            if dataset in self._mapped:  # its lists live in that file, not in memory: copied as they are
                shutil.copyfile(self._mapped[dataset], path)
            else:
                faiss.write_index(self.indexes[dataset], str(path))
            files = [path]
            if dataset in self.stored:
                entry["vectors"] = f"{n:03d}-{token}.npy"
                _write_npy(folder / entry["vectors"], self.stored[dataset])
                files.append(folder / entry["vectors"])
            if dataset in self.rows:
                entry["rows"] = f"{n:03d}-{token}.rows.npy"
                _write_npy(folder / entry["rows"], self.rows[dataset])
                files.append(folder / entry["rows"])
            for f in files:
                fsync_path(f)
            if dataset in self.factories:
                entry["factory"] = self.factories[dataset]
            if dataset in self.on_disk:
                entry["on_disk"] = True
                written[dataset] = path
            meta["datasets"][dataset] = entry
        # One writer per index folder, so a temporary file of this name is a killed save's.
        write_json_atomic(folder / "gallery_index.json", meta, remove_stale=True)
        self._mapped.update({d: p for d, p in written.items() if d in self._mapped})
        # Only what an index of ours left: the old index's files, and files of a save killed
        # midway (our own name patterns). Anything else in the folder is someone else's.
        kept = {str(entry[key]) for entry in meta["datasets"].values() for key in _FILE_KEYS if key in entry}
        ours = [f for f in folder.iterdir() if f.name in previous or _OWN_FILE.fullmatch(f.name)]
        for stale in ours:
            if stale.name not in kept:
                stale.unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> GalleryIndex:
        folder = Path(folder)
        meta_path = folder / "gallery_index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: build the index with `cir search build`")
        meta = json.loads(meta_path.read_text())
        out = cls(meta["kind"], meta.get("fingerprint"))
        for dataset, entry in meta["datasets"].items():
            path = folder / entry["file"]
            if entry.get("on_disk"):
                out.indexes[dataset] = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                out.on_disk.add(dataset)
                out._mapped[dataset] = path
            else:
                out.indexes[dataset] = faiss.read_index(str(path))
            out.ids[dataset] = entry["ids"]
            if "factory" in entry:
                out.factories[dataset] = entry["factory"]
            if "vectors" in entry:
                out.stored[dataset] = _map_npy(folder / entry["vectors"])
            if "rows" in entry:
                rows = out.rows[dataset] = np.load(folder / entry["rows"], allow_pickle=False)
                out._views[dataset] = int(np.bincount(rows // out.stored[dataset].shape[1]).max())
            indexed = len(out.rows[dataset]) if dataset in out.rows else len(entry["ids"])
            if out.indexes[dataset].ntotal != indexed:
                raise ValueError(f"{path}: {out.indexes[dataset].ntotal} vectors for {indexed} entries of "
                                 f"{meta_path}; rebuild the index")
        search = meta.get("search", {})
        out.configure(**{k: v for k, v in search.items() if k in ("nprobe", "ef_search", "rerank")})
        return out


def _factory(kind: str, n: int, dim: int, options: Mapping[str, Any]) -> str:
    """The factory string ``build_faiss_index`` resolves ``kind`` to with these options."""
    return factory_for(kind, n, dim, options.get("nlist"), options.get("hnsw_m", 32), options.get("pq_m"),
                       options.get("train_size", 100_000))


def _shares(own: np.ndarray, embeddings: Any) -> bool:
    """Whether ``own`` may be the caller's memory (a float32 CPU tensor's is shared by its numpy view)."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dtype != torch.float32 or embeddings.device.type != "cpu":
            return False
        embeddings = embeddings.detach().numpy()
    return isinstance(embeddings, np.ndarray) and np.may_share_memory(own, embeddings)


def as_mask(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def _rescore(stored: np.ndarray, q: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidates ``idx`` (-1: none), best ``k`` first."""
    out_s, out_i = [], []
    for start in range(0, len(q), RERANK_CHUNK):
        cand = idx[start:start + RERANK_CHUNK]
        valid = cand >= 0
        vecs = np.take(stored, np.maximum(cand, 0).ravel(), axis=0).reshape(*cand.shape, -1)
        scores = np.matmul(vecs, q[start:start + RERANK_CHUNK, :, None])[..., 0]
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_s.append(np.take_along_axis(scores, order, 1))
        out_i.append(np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(cand, order, 1), -1))
    return np.concatenate(out_s), np.concatenate(out_i)


def maxsim_scores(stored: np.ndarray, products: np.ndarray, query: np.ndarray) -> np.ndarray:
    """MaxSim of one query (``[W, D]`` present vectors) with each of ``products`` (rows of ``stored``,
    ``[N, D]`` or ``[N, V, D]`` with zero rows for absent views)."""
    vecs = np.asarray(stored[products], dtype=np.float32)
    if vecs.ndim == 2:
        vecs = vecs[:, None]
    scores = np.einsum("cvd,wd->cvw", vecs, query)
    scores[~_present(vecs)] = -np.inf
    return scores.max(axis=(1, 2)) if len(products) else np.zeros(0, np.float32)
