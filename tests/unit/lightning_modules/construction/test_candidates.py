"""The candidate pool equals a brute-force reference: per path, the top-k inner products inside
the source's group (itself excluded); then their union."""

from __future__ import annotations

import numpy as np

from lightning_modules.construction.candidates import candidate_pools, sample_candidates


def test_pools_equal_brute_force_union_within_groups() -> None:
    rng = np.random.default_rng(0)
    n, k = 90, 5
    ids = [f"p{i:03d}" for i in range(n)]
    groups = [("train" if i % 3 else "val", "ds", ["dress", "skirt"][i % 2], "") for i in range(n)]
    paths = {name: rng.standard_normal((n, 8)).astype(np.float32) for name in ("image", "long", "short")}
    pools = candidate_pools(ids, groups, paths, k=k)
    for i in range(n):
        same = [j for j in range(n) if groups[j] == groups[i] and j != i]
        expected: set[str] = set()
        for matrix in paths.values():
            scores = {j: float(matrix[i] @ matrix[j]) for j in same}
            expected |= {ids[j] for j in sorted(same, key=lambda j: -scores[j])[:k]}
        assert set(pools[ids[i]]) == expected
        assert len(pools[ids[i]]) == len(expected) <= 3 * k
        assert all(groups[ids.index(c)] == groups[i] for c in pools[ids[i]])


def test_gender_splits_a_category_when_known() -> None:
    groups = [("train", "d", "jacket", "men"), ("train", "d", "jacket", "women"), ("train", "d", "jacket", "men"),
              ("train", "d", "jacket", "women"), ("val", "d", "jacket", "men")]
    pools = candidate_pools(["m1", "w1", "m2", "w2", "m3"], groups, {"image": np.ones((5, 4), np.float32)}, k=20)
    assert pools == {"m1": ["m2"], "w1": ["w2"], "m2": ["m1"], "w2": ["w1"], "m3": []}


def test_a_group_of_one_has_no_candidates() -> None:
    groups = [("train", "d", "x", ""), ("train", "d", "y", ""), ("train", "d", "y", "")]
    pools = candidate_pools(["a", "b", "c"], groups, {"image": np.eye(3, dtype=np.float32)}, k=20)
    assert pools == {"a": [], "b": ["c"], "c": ["b"]}


def test_sampling_is_seeded_by_source() -> None:
    pool = [f"c{i}" for i in range(40)]
    first = sample_candidates("src", pool, 10, seed=0)
    assert first == sample_candidates("src", list(pool), 10, seed=0)
    assert len(set(first)) == 10 and set(first) <= set(pool)
    assert first != sample_candidates("src", pool, 10, seed=1)
    assert sample_candidates("src", pool[:4], 10, seed=0) == sample_candidates("src", pool[:4], 10, seed=0)
    assert sorted(sample_candidates("src", pool[:4], 10, seed=0)) == sorted(pool[:4])
