"""Generated multi-turn sessions: chains of new products p0 → p1 → … → pT, each turn changing
attributes that no earlier turn of the session changed, so a turn never undoes or redoes another and
the target of turn t holds every change of turns 0…t (a model has to carry the earlier turns).

A share of the turns (``view_incomplete_share``) changes only what the front cannot show (the back
design, the side details): every chain product is seen first from the front, so such a turn is
view-incomplete (``Triplet.view_incomplete``); a back or side view that both products of the turn
have shows the change. The other turns change what the front shows.

The chain products are added to the split's products (its gallery) after the single-turn data is
drawn, from their own random stream: the single-turn products and triplets stay exactly what
``generate`` makes for the seed. Every product's attribute set stays unique over the whole dataset
and none joins a single-turn group as an extra sibling (``_Occupancy``), so a session's products
belong to one split only and each turn's text identifies its target.
"""

from __future__ import annotations

import math
import random

from ..session_shards import SessionRecord
from .attributes import ATTRIBUTE_VALUES, CATEGORIES, CATEGORY_ATTRIBUTES, FRONT_HIDDEN, sample_attributes
from .generate import SIDES, SPLITS, ProductSpec, SyntheticData, _Occupancy, _sample_views, triplet_between

Turn = tuple[dict[str, str], bool]  # the turn's changes (attribute → new value), whether view-incomplete


def session_count(sessions: float, products: int) -> int:
    """``--sessions``: a count (1 or more), or a share of ``products`` (between 0 and 1)."""
    if sessions < 0 or (sessions >= 1 and sessions != int(sessions)):
        raise ValueError(f"--sessions {sessions}: a count (0, 1, 2, …) or a share of --products below 1")
    return int(sessions) if sessions >= 1 or sessions == 0 else max(1, round(sessions * products))


def _occupancy(data: SyntheticData) -> _Occupancy:
    """The generator's record of what was drawn, rebuilt from its output."""
    drawn = _Occupancy()
    grouped = set()
    for g in data.groups:
        for pid in g.members:
            spec = data.products[pid]
            drawn.add((data.split_of[pid], spec.dataset), spec.attributes, g.axes)
            grouped.add(pid)
    for pid, spec in data.products.items():
        if pid not in grouped:
            drawn.add((data.split_of[pid], spec.dataset), spec.attributes)
    return drawn


def _plan(rng: random.Random, category: str, turns: int, hidden_share: float) -> list[tuple[list[str], bool]]:
    """Per turn, the attributes it changes (none changed twice in the session) and whether all are
    hidden from the front. Each turn changes 1 or 2; a visible turn only what the front shows."""
    names = list(CATEGORY_ATTRIBUTES[category])
    hidden = [a for a in names if a in FRONT_HIDDEN]
    visible = [a for a in names if a not in FRONT_HIDDEN]
    rng.shuffle(hidden)
    rng.shuffle(visible)
    kinds = [bool(hidden) and rng.random() < hidden_share for _ in range(turns)]
    while sum(kinds) > len(hidden):  # more hidden turns than hidden attributes: the last ones turn visible
        kinds[max(i for i, k in enumerate(kinds) if k)] = False
    while turns - sum(kinds) > len(visible):  # a 5-turn skirt: 4 visible attributes, so one turn is hidden
        kinds[kinds.index(False)] = True
    plan = []
    for t, is_hidden in enumerate(kinds):
        pool = hidden if is_hidden else visible
        later = sum(1 for k in kinds[t + 1:] if k == is_hidden)  # turns that still need one of this pool
        n = 2 if len(pool) - later >= 2 and rng.random() < 0.35 else 1
        plan.append(([pool.pop() for _ in range(n)], is_hidden))
    return plan


def _anchors(rng: random.Random, changed: list[str]) -> set[str]:
    """The views a hidden turn's two products share to show its changes; the front shows the rest."""
    return {"back" if a == "back" else rng.choice(SIDES) for a in changed if a in FRONT_HIDDEN}


def _draw_session(rng: random.Random, data: SyntheticData, drawn: _Occupancy, where: tuple[str, str],
                  turns: int, hidden_share: float) -> tuple[list[dict[str, str]], list[tuple[list[str], bool]]]:
    for _ in range(200):
        fitting = [c for c in CATEGORIES if len(CATEGORY_ATTRIBUTES[c]) >= turns]
        category = rng.choice(fitting)
        plan = _plan(rng, category, turns, hidden_share)
        chain = [sample_attributes(rng, category)]
        for changed, _ in plan:
            chain.append({**chain[-1], **{a: rng.choice([v for v in ATTRIBUTE_VALUES[a] if v != chain[-1][a]])
                                          for a in changed}})
        if all(drawn.free(where, [[attrs]]) for attrs in chain):
            return chain, plan
    raise RuntimeError("could not draw a session unlike every earlier product in 200 tries: too many products "
                       "for the attribute space")


def add_sessions(data: SyntheticData, count: int, seed: int = 0, val_fraction: float = 0.2, min_turns: int = 2,
                 max_turns: int = 5, view_incomplete_share: float = 0.3) -> dict[str, list[SessionRecord]]:
    """Add ``count`` sessions (val gets ``val_fraction`` of them, train the rest) and their chain products
    to ``data``; returns the sessions per split. Deterministic in ``seed``."""
    if not 2 <= min_turns <= max_turns <= 5:
        raise ValueError(f"turns {min_turns}-{max_turns}: generated sessions have 2 <= min <= max <= 5 turns "
                         "(a skirt has 5 attributes to change)")
    rng = random.Random(f"{seed}|sessions")
    drawn = _occupancy(data)
    n_val = min(count, math.ceil(count * val_fraction)) if val_fraction > 0 else 0
    out: dict[str, list[SessionRecord]] = {split: [] for split in SPLITS}
    styles = sorted(data.styles)
    for n in range(count):
        split = "val" if n < n_val else "train"
        dataset = rng.choice(styles)
        turns = rng.randint(min_turns, max_turns)
        chain, plan = _draw_session(rng, data, drawn, (split, dataset), turns, view_incomplete_share)
        anchors = [_anchors(rng, changed) for changed, _ in plan]
        specs = []
        for k, attrs in enumerate(chain):
            # Front first (what every turn's view incompleteness is measured against), plus the views
            # that show the hidden changes of the turns this product takes part in.
            need = (anchors[k - 1] if k else set()) | (anchors[k] if k < len(plan) else set())
            views = _sample_views(rng, data.styles[dataset], need, front=True)
            pid = f"p{len(data.products):06d}"
            data.products[pid] = ProductSpec(pid, dataset, attrs, views, rng.getrandbits(32))
            data.split_of[pid] = split
            drawn.add((split, dataset), attrs)
            specs.append(data.products[pid])
        triplets = []
        for k, (_, is_hidden) in enumerate(plan):
            t = triplet_between(specs[k], specs[k + 1], rng)
            if t is None or t.view_incomplete != is_hidden:
                raise AssertionError(f"generator bug: session turn {specs[k].product_id}->{specs[k + 1].product_id} "
                                     f"is not a fair {'view-incomplete ' if is_hidden else ''}query")
            triplets.append(t)
        out[split].append(SessionRecord(f"s{n:06d}", dataset, triplets))
    return out
