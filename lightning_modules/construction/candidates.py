"""Stage 3's candidate pool: for each source, the union of its top-k neighbours on three paths
(image, long caption, short caption), searched with faiss among products of the same split,
dataset, category and gender (when known); then a seeded sample of ``n`` from the union."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..retrieval.gallery_index import build_faiss_index

GroupKey = tuple[str, ...]


def neighbours(vectors: np.ndarray, k: int) -> list[list[int]]:
    """Top-``k`` rows by inner product for every row, itself excluded (exact, faiss flat index)."""
    n = len(vectors)
    if n <= 1:
        return [[] for _ in range(n)]
    index = build_faiss_index(vectors, "flat")
    _, found = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k + 1, n))
    out = []
    for i, row in enumerate(found):
        out.append([int(j) for j in row if j != i and j >= 0][:k])
    return out


def candidate_pools(ids: Sequence[str], groups: Sequence[GroupKey], paths: dict[str, np.ndarray],
                    k: int = 20) -> dict[str, list[str]]:
    """{source id: union of its per-path top-``k`` neighbours inside its group, in path order}."""
    members: dict[GroupKey, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    pools: dict[str, list[str]] = {}
    for rows in members.values():
        found = {name: neighbours(matrix[rows], k) for name, matrix in paths.items()}
        for local, i in enumerate(rows):
            union = dict.fromkeys(ids[rows[j]] for name in paths for j in found[name][local])
            pools[ids[i]] = list(union)
    return pools


def sample_candidates(source: str, pool: list[str], n: int, seed: int) -> list[str]:
    """``n`` of the pool, drawn by a generator seeded from the source id: the same on every rerun."""
    rng = random.Random(int(hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:16], 16))
    return rng.sample(pool, min(n, len(pool)))
