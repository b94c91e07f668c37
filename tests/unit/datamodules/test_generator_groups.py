"""The generator's CIRR-style layout (version 4), checked by brute force over the generated products
rather than through the generator's own bookkeeping: query groups, text twins, view incompleteness,
and three oracles that bound what a ranking can reach from the images alone, from the text alone,
and from both."""

from __future__ import annotations

from collections import Counter
from statistics import mean

import pytest

from datamodules.synthetic import DatasetStyle, generate
from datamodules.synthetic.attributes import change_views
from datamodules.synthetic.generate import ProductSpec, SyntheticData

SHARE = 0.3


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(600, seed=7, view_incomplete_share=SHARE)


def _gallery(data: SyntheticData, split: str, dataset: str, source: str) -> list[ProductSpec]:
    """What a query of ``dataset`` in ``split`` is ranked against: that split's products of that
    sub-dataset, its source removed (CIRR's protocol)."""
    return [p for p in data.split_products(split) if p.dataset == dataset and p.product_id != source]


def _differs(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _expected_hit(higher: int, ties: int, k: int) -> float:
    """P(rank < k) for a target with ``higher`` items above it and ``ties`` others scoring the same,
    ties broken uniformly at random."""
    return max(0, min(ties + 1, k - higher)) / (ties + 1)


def test_every_subset_holds_the_target_and_its_siblings(data: SyntheticData) -> None:
    sizes = Counter()
    for split, triplets in data.triplets.items():
        for t in triplets:
            src, tgt = data.products[t.source_id].attributes, data.products[t.target_id].attributes
            changed = set(t.changes)
            assert t.target_id in t.subset_ids and t.source_id not in t.subset_ids
            assert 4 <= len(set(t.subset_ids)) == len(t.subset_ids) <= 8  # the default group_sizes
            sizes[len(t.subset_ids)] += 1
            for pid in t.subset_ids:
                member = data.products[pid]
                assert (data.split_of[pid], member.dataset) == (split, t.dataset)
                # Equal to the target outside the changed attributes, and as far from the source as
                # the target is: other values of every changed attribute.
                assert _differs(member.attributes, tgt) <= changed
                assert all(member.attributes[a] != src[a] for a in changed)
            # Brute force: every such product of the gallery is in the subset, and nothing else is.
            siblings = {p.product_id for p in _gallery(data, split, t.dataset, t.source_id)
                        if _differs(p.attributes, tgt) <= changed and all(p.attributes[a] != src[a] for a in changed)}
            assert siblings == set(t.subset_ids)
    print("subset sizes (target + siblings):", sorted(sizes.items()))


def test_every_query_has_text_twins_on_other_bases(data: SyntheticData) -> None:
    """Products that carry the requested values but not the target's base: a text-only ranking cannot
    tell them from the target. At least one matches the words the short text uses besides the changes
    (the source's category and, unless it changes, its colour)."""
    counts = []
    for split, triplets in data.triplets.items():
        for t in triplets:
            src, tgt = data.products[t.source_id].attributes, data.products[t.target_id].attributes
            requested = {a: new for a, (_, new) in t.changes.items()}
            twins = [p.attributes for p in _gallery(data, split, t.dataset, t.source_id)
                     if p.product_id != t.target_id and all(p.attributes.get(a) == v for a, v in requested.items())]
            assert twins and all(_differs(p, tgt) - set(t.changes) for p in twins)
            assert any(p["category"] == src["category"] and ("colour" in requested or p["colour"] == src["colour"])
                       for p in twins)
            counts.append(len(twins))
    print(f"text twins per query: min {min(counts)}, mean {mean(counts):.1f}")


def test_view_incomplete_share_and_what_the_views_show(data: SyntheticData) -> None:
    flags = {split: [t.view_incomplete for t in ts] for split, ts in data.triplets.items()}
    pooled = mean(f for fs in flags.values() for f in fs)
    print("view-incomplete share:", {s: round(mean(f), 3) for s, f in flags.items()}, "pooled", round(pooled, 3),
          "asked", SHARE)
    assert abs(pooled - SHARE) <= 0.05
    assert all(abs(mean(f) - SHARE) <= 0.1 for f in flags.values())
    kinds = Counter()
    for t in data.triplets["train"] + data.triplets["val"]:
        src, tgt = data.products[t.source_id], data.products[t.target_id]
        first = src.view_names[0]
        shown = [a for a, (old, new) in t.changes.items() if first in change_views(a, old, new)]
        assert t.view_incomplete == (not shown)
        for a, (old, new) in t.changes.items():  # some view of both products shows every change
            assert set(change_views(a, old, new)) & set(src.view_names) & set(tgt.view_names)
        if t.view_incomplete:
            kinds[(first, *sorted(t.changes))] += 1
    # Both kinds: back and side details behind a front view, chest details behind a side view.
    assert {k[0] for k in kinds} >= {"front", "side_left"} or {k[0] for k in kinds} >= {"front", "side_right"}
    for share in (0.0, 0.6):
        other = generate(400, seed=3, view_incomplete_share=share)
        got = mean(t.view_incomplete for ts in other.triplets.values() for t in ts)
        assert abs(got - share) <= 0.06, (share, got)


def test_groups_never_straddle_splits_or_sub_datasets(data: SyntheticData) -> None:
    bundles: dict[int, set[tuple[str, str]]] = {}
    for g in data.groups:
        where = {(data.split_of[m], data.products[m].dataset) for m in g.members}
        assert len(where) == 1
        bundles.setdefault(g.bundle, set()).update(where)
    assert all(len(w) == 1 for w in bundles.values())
    group_of = {m: i for i, g in enumerate(data.groups) for m in g.members}
    for split, triplets in data.triplets.items():
        for t in triplets:
            assert group_of[t.source_id] == group_of[t.target_id]
            assert data.split_of[t.source_id] == data.split_of[t.target_id] == split
    assert len(data.products) - len(group_of) < 10  # only a remainder too small for a bundle is left out


def test_text_blind_oracle_can_only_guess_among_the_siblings(data: SyntheticData) -> None:
    """Ranks the gallery by the number of attributes shared with the source, the text ignored. A tie
    counts against the target (pessimistic) and, separately, is broken at random (expected)."""
    pessimistic: dict[int, list[bool]] = {1: [], 5: [], 10: []}
    expected: dict[int, list[float]] = {1: [], 5: [], 10: []}
    bounds = []
    for t in data.triplets["val"]:
        src = data.products[t.source_id].attributes
        score = {p.product_id: sum(p.attributes.get(k) == v for k, v in src.items())
                 for p in _gallery(data, "val", t.dataset, t.source_id)}
        target = score.pop(t.target_id)
        higher = sum(s > target for s in score.values())
        ties = sum(s == target for s in score.values())
        bound = 1 / len(t.subset_ids)  # 1 / (siblings + 1)
        bounds.append(bound)
        for k in pessimistic:
            pessimistic[k].append(higher + ties < k)
            expected[k].append(_expected_hit(higher, ties, k))
        assert expected[1][-1] <= bound + 1e-9  # per query: a guess among at least the subset
    r = {k: (round(mean(pessimistic[k]), 3), round(mean(expected[k]), 3)) for k in pessimistic}
    print(f"text-blind oracle, val, source removed: R@K (pessimistic, expected) {r}; "
          f"bound mean 1/(siblings+1) = {mean(bounds):.3f}")
    assert mean(pessimistic[1]) <= mean(bounds) + 0.02
    assert mean(expected[1]) <= mean(bounds) + 0.02


def test_text_only_oracle_can_only_guess_among_the_twins(data: SyntheticData) -> None:
    """Ranks the gallery by whether a product has the requested values (and, in the stronger variant,
    the source's category and colour, which the short text names), the images ignored."""
    plain, worded = [], []
    for t in data.triplets["val"]:
        src = data.products[t.source_id].attributes
        requested = {a: new for a, (_, new) in t.changes.items()}
        others = [p.attributes for p in _gallery(data, "val", t.dataset, t.source_id) if p.product_id != t.target_id]
        matches = [p for p in others if all(p.get(a) == v for a, v in requested.items())]
        same_words = [p for p in matches
                      if p["category"] == src["category"] and ("colour" in requested or p["colour"] == src["colour"])]
        plain.append(_expected_hit(0, len(matches), 1))
        worded.append(_expected_hit(0, len(same_words), 1))
        assert matches  # pessimistic R@1 of the text-only oracle is 0 on every query
    print(f"text-only oracle, val: expected R@1 {mean(plain):.3f} (requested values), {mean(worded):.3f} "
          "(requested values + category + colour); pessimistic R@1 0")
    assert max(plain) <= 0.5 and max(worded) <= 0.5


def test_source_plus_changes_identify_exactly_the_target(data: SyntheticData) -> None:
    hits = []
    for split, triplets in data.triplets.items():
        for t in triplets:
            wanted = dict(data.products[t.source_id].attributes)
            wanted.update({a: new for a, (_, new) in t.changes.items()})
            found = [p.product_id for p in _gallery(data, split, t.dataset, t.source_id) if p.attributes == wanted]
            hits.append(found == [t.target_id])
    print(f"full-information oracle R@1 {mean(hits):.3f} over {len(hits)} queries")
    assert all(hits)


def test_every_style_in_both_splits_and_deterministic() -> None:
    styles = {"a": DatasetStyle(48, 1, 5), "b": DatasetStyle(64, 2, 4, front_prob=0.5), "c": DatasetStyle(32, 3, 3)}
    first, again = generate(400, seed=2, styles=styles), generate(400, seed=2, styles=styles)
    assert [t.meta() for ts in first.triplets.values() for t in ts] == \
           [t.meta() for ts in again.triplets.values() for t in ts]
    assert [p.view_names for p in first.products.values()] == [p.view_names for p in again.products.values()]
    for split, triplets in first.triplets.items():
        assert {t.dataset for t in triplets} == set(styles), split


@pytest.mark.parametrize("kwargs", [{"view_incomplete_share": 1.5}, {"group_sizes": (1, 4)},
                                    {"group_sizes": (4, 13)}, {"groups_per_bundle": 1}])
def test_bad_generator_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate(100, **kwargs)
