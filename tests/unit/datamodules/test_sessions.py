"""Multi-turn sessions chained from triplets: chain counts equal a brute-force enumeration, sampled
sessions are valid, disjoint and seeded, and the real FashionIQ annotations hold chains."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from datamodules.sessions import count_chains, sample_sessions, session_lengths

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "fashioniq"


@dataclass
class T:
    source_id: str
    target_id: str | None
    dataset: str = "d"


def _random_triplets(seed: int, n: int = 9, products: int = 6) -> list[T]:
    rng = random.Random(seed)
    out = [T(f"p{rng.randrange(products)}", f"p{rng.randrange(products)}", rng.choice("dd e")) for _ in range(n)]
    return [t for t in out if t.dataset.strip()] + [T("p0", None)]  # and a query-only triplet


def _is_chain(triplets: list[T], order: tuple[int, ...]) -> bool:
    ts = [triplets[i] for i in order]
    if any(t.target_id is None or t.target_id == t.source_id for t in ts):
        return False
    if any(a.target_id != b.source_id or a.dataset != b.dataset for a, b in zip(ts, ts[1:], strict=False)):
        return False
    products = [ts[0].source_id] + [t.target_id for t in ts]
    return len(set(products)) == len(products)


@pytest.mark.parametrize("seed", range(6))
def test_chain_counts_equal_brute_force(seed: int) -> None:
    triplets = _random_triplets(seed)
    expected = {k: sum(_is_chain(triplets, p) for p in itertools.permutations(range(len(triplets)), k))
                for k in range(1, 5)}
    got = count_chains(triplets, max_turns=4)
    assert {k: got.get(k, 0) for k in range(1, 5)} == expected


@pytest.mark.parametrize("seed", range(4))
def test_sampled_sessions_are_chains_disjoint_and_seeded(seed: int) -> None:
    triplets = _random_triplets(seed, n=40, products=12)
    sessions = sample_sessions(triplets, min_turns=2, max_turns=4, seed=seed)
    used = [n for s in sessions for n in s.turns]
    assert len(used) == len(set(used))
    assert all(2 <= len(s) <= 4 and _is_chain(triplets, s.turns) for s in sessions)
    assert sessions == sample_sessions(triplets, min_turns=2, max_turns=4, seed=seed)
    with pytest.raises(ValueError, match="min_turns"):
        sample_sessions(triplets, min_turns=3, max_turns=2)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the real FashionIQ annotations are in ../shared")
def test_the_real_fashioniq_annotations_hold_chains() -> None:
    for category in ("dress", "shirt", "toptee"):
        caps = json.loads((SHARED / "captions" / f"cap.{category}.val.json").read_text())
        triplets = [T(c["candidate"], c["target"], category) for c in caps]
        counts = count_chains(triplets, max_turns=5)
        assert counts[1] == sum(t.target_id != t.source_id for t in triplets)
        assert counts[2] > 0 and all(counts[k] >= counts[k + 1] for k in range(2, 5))
        sessions = sample_sessions(triplets, seed=0)
        lengths = session_lengths(sessions)
        assert sessions and min(lengths) >= 2
        print(category, dict(sorted(counts.items())), lengths)
