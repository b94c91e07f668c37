"""A saved, searchable gallery: one faiss index per dataset, exact or approximate.

``flat`` is exact inner-product search (embeddings are unit vectors, so cosine). For very large
catalogues ``ivf`` (inverted lists, ``nprobe`` of ``nlist`` cells searched) and ``hnsw`` (graph
search) trade a little recall for speed; ``benchmarks/search_backends.py`` measures the trade.

An index also keeps the fingerprint of the model that embedded it (``fingerprint``: string fields
such as the model class, config and checkpoint hashes, written by ``cir search build``), so a query
embedded by another model can be refused instead of ranked against vectors of a different space.
Indexes saved before fingerprints were recorded load with ``fingerprint = None``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from datamodules.atomic import write_json_atomic

IndexKind = Literal["flat", "ivf", "hnsw"]


def _as_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def build_faiss_index(vectors: np.ndarray, kind: IndexKind = "flat", nlist: int | None = None,
                      nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, train_size: int = 100_000,
                      seed: int = 0) -> faiss.Index:
    vectors = _as_f32(vectors)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, min(4 * int(math.sqrt(n)), n // 39))  # faiss wants >= 39 points per cell
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, size=min(n, train_size), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose flat, ivf or hnsw")
    index.add(vectors)
    return index


# The faiss files a save writes (``000.faiss`` before names carried a token).
_OWN_FILE = re.compile(r"\d{3}(-[0-9a-f]{8})?\.faiss")


def _files_named(meta_path: Path) -> set[str]:
    """The files the index at ``meta_path`` names (none when it is missing or unreadable)."""
    try:
        meta = json.loads(meta_path.read_text())
        return {str(entry["file"]) for entry in meta["datasets"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


class GalleryIndex:
    """Per-dataset faiss indexes over product embeddings, with the products' ids."""

    def __init__(self, kind: IndexKind = "flat", fingerprint: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.indexes: dict[str, faiss.Index] = {}
        self.ids: dict[str, list[str]] = {}
        self.fingerprint = fingerprint  # the embedding model's identity; None: not recorded (an old index)

    @classmethod
    def build(cls, embeddings: Any, ids: Sequence[str], datasets: Sequence[str], kind: IndexKind = "flat",
              fingerprint: dict[str, str] | None = None, **options: Any) -> GalleryIndex:
        vectors = _as_f32(embeddings)
        if not len(vectors) == len(ids) == len(datasets):
            raise ValueError(f"{len(vectors)} embeddings, {len(ids)} ids and {len(datasets)} datasets differ")
        out = cls(kind, fingerprint)
        for dataset in sorted(set(datasets)):
            rows = [i for i, d in enumerate(datasets) if d == dataset]
            out.indexes[dataset] = build_faiss_index(vectors[rows], kind, **options)
            out.ids[dataset] = [ids[i] for i in rows]
        return out

    def search(self, queries: Any, k: int, dataset: str | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` (id, score) per query in ``dataset``'s gallery (the only one when None)."""
        if dataset is None:
            if len(self.indexes) != 1:
                raise ValueError(f"this index holds datasets {sorted(self.indexes)}: name one with dataset=")
            dataset = next(iter(self.indexes))
        if dataset not in self.indexes:
            raise KeyError(f"no gallery for dataset {dataset!r}; the index holds {sorted(self.indexes)}")
        scores, idx = self.indexes[dataset].search(_as_f32(queries), k)
        names = self.ids[dataset]
        return [[(names[i], float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
                for row_i, row_s in zip(idx, scores, strict=True)]

    def save(self, folder: str | Path) -> Path:
        """Into ``folder``, replacing an index there only once the new one is whole: the faiss files
        get names of their own, ``gallery_index.json`` (which names them) is renamed into place last,
        and only then are the files of the old index removed. A kill at any moment leaves the old
        index or the new one, never a mixture."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        previous = _files_named(folder / "gallery_index.json")
        meta: dict[str, Any] = {"kind": self.kind, "datasets": {}}
        if self.fingerprint is not None:
            meta["fingerprint"] = dict(self.fingerprint)
        token = uuid.uuid4().hex[:8]
        for n, (dataset, index) in enumerate(sorted(self.indexes.items())):
            name = f"{n:03d}-{token}.faiss"
            faiss.write_index(index, str(folder / name))
            meta["datasets"][dataset] = {"file": name, "ids": self.ids[dataset]}
        # One writer per index folder, so a temporary file of this name is a killed save's.
        write_json_atomic(folder / "gallery_index.json", meta, remove_stale=True)
        # Only what an index of ours left: the old index's files, and faiss files of a save killed
        # midway (our own name pattern). Anything else in the folder is someone else's.
        kept = {entry["file"] for entry in meta["datasets"].values()}
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
            out.indexes[dataset] = faiss.read_index(str(folder / entry["file"]))
            out.ids[dataset] = entry["ids"]
        return out
