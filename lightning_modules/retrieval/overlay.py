"""The parts of a ``MutableGallery`` that are not its log: the exact overlay of added or replaced
products, and what a saved base index is (its identity, its vectors, how it was built)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .gallery_index import GalleryIndex
from .store import Hit


def base_id(folder: Path) -> str:
    """Which saved base an index folder holds: its faiss file names, new at every save."""
    try:
        meta = json.loads((folder / "gallery_index.json").read_text())
        return ",".join(sorted(str(e["file"]) for e in meta["datasets"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def base_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector of a faiss index, in insertion order (flat, IVF-flat and HNSW-flat store them whole)."""
    if index.ntotal == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def build_options(base: GalleryIndex) -> dict[str, Any]:
    """How a base was built and is searched, kept when it is rebuilt: the faiss settings, and (where
    the index keeps them) its stored vectors, re-ranking depth and on-disk lists."""
    out: dict[str, Any] = {}
    index = next(iter(base.indexes.values()), None)
    ivf = faiss.try_extract_index_ivf(index) if index is not None else None
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
    elif hasattr(index, "hnsw"):
        out.update(hnsw_m=int(index.hnsw.nb_neighbors(1)), ef_search=int(index.hnsw.efSearch))
    if getattr(base, "stored", None):
        out["store_vectors"] = True
        out["rerank"] = int(getattr(base, "defaults", {}).get("rerank", 0))
    if getattr(base, "on_disk", None):
        out["on_disk"] = True
    return out


def vectors_of(base: GalleryIndex, dataset: str) -> np.ndarray:
    """A base dataset's vectors in id order: the index's own (stored ones where it keeps them), else
    rebuilt from faiss."""
    own = getattr(base, "vectors", None)
    return np.asarray(own(dataset), dtype=np.float32) if callable(own) else base_vectors(base.indexes[dataset])


def is_multi_vector(base: GalleryIndex) -> bool:
    return any(len(r) for r in getattr(base, "rows", {}).values())


@dataclass
class Overlay:
    """One dataset's added or replaced products: an exact search over a growing array."""

    dim: int
    ids: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    vectors: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.vectors = np.zeros((16, self.dim), dtype=np.float32)

    def put(self, pid: str, vector: np.ndarray) -> None:
        row = self.rows.get(pid)
        if row is None:
            row = len(self.ids)
            if row == len(self.vectors):  # doubling: n adds cost O(n) copies in all
                self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
            self.ids.append(pid)
            self.rows[pid] = row
        self.vectors[row] = vector

    def remove(self, pid: str) -> bool:
        row = self.rows.pop(pid, None)
        if row is None:
            return False
        last = len(self.ids) - 1
        if row != last:  # the last product takes the freed row
            self.ids[row], self.vectors[row] = self.ids[last], self.vectors[last]
            self.rows[self.ids[row]] = row
        self.ids.pop()
        return True

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        n = len(self.ids)
        if n == 0 or k <= 0:
            return [[] for _ in queries]
        scores = queries @ self.vectors[:n].T
        k = min(k, n)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for row, cand in zip(scores, top, strict=True):
            order = cand[np.argsort(-row[cand], kind="stable")]
            out.append([(self.ids[i], float(row[i])) for i in order])
        return out
