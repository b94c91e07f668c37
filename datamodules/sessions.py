"""Multi-turn sessions from single-turn triplets: a triplet whose target is another triplet's source
continues it, as if the shopper had clicked the target and asked for one more change (the
construction of Multi-turn FashionIQ, Yuan and Lam, SIGIR 2021).

``count_chains`` says how many chains of each length a set of triplets holds (every simple path of
the source → target graph within a dataset, no product visited twice); ``sample_sessions`` draws
sessions from them, seeded, each triplet used as a turn at most once, so that no two sessions share
a turn and a split's sessions can be trained or evaluated without counting one annotation twice.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class TripletLike(Protocol):
    source_id: str
    target_id: str | None
    dataset: str


@dataclass(frozen=True)
class Session:
    """Turns in order: turn t's target is turn t+1's source."""

    dataset: str
    turns: tuple[int, ...]  # indexes into the triplet list the session was drawn from

    def __len__(self) -> int:
        return len(self.turns)


def _graph(triplets: Sequence[TripletLike]) -> dict[tuple[str, str], list[int]]:
    """(dataset, source id) → the triplets leaving it, in input order (query-only triplets left out)."""
    out: dict[tuple[str, str], list[int]] = defaultdict(list)
    for n, t in enumerate(triplets):
        if t.target_id is not None and t.target_id != t.source_id:
            out[(t.dataset, t.source_id)].append(n)
    return out


def count_chains(triplets: Sequence[TripletLike], max_turns: int = 5) -> Counter[int]:
    """Chains by number of turns (1 = every usable triplet): simple paths of up to ``max_turns``
    triplets, each continuing from its predecessor's target, no product visited twice."""
    graph = _graph(triplets)
    counts: Counter[int] = Counter()

    def walk(dataset: str, product: str, depth: int, seen: frozenset[str]) -> None:
        if depth == max_turns:
            return
        for n in graph.get((dataset, product), []):
            target = str(triplets[n].target_id)
            if target in seen:
                continue
            counts[depth + 1] += 1
            walk(dataset, target, depth + 1, seen | {target})

    for dataset, source in list(graph):
        walk(dataset, source, 0, frozenset({source}))
    return counts


def sample_sessions(triplets: Sequence[TripletLike], min_turns: int = 2, max_turns: int = 5,
                    seed: int = 0) -> list[Session]:
    """Disjoint sessions of ``min_turns``-``max_turns`` turns. Starts are visited in a seeded order;
    from each, a seeded walk takes unused continuations (no product twice) until ``max_turns`` or a
    dead end; a walk shorter than ``min_turns`` gives its triplets back."""
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"turns {min_turns}-{max_turns}: need 1 <= min_turns <= max_turns")
    graph = _graph(triplets)
    rng = random.Random(seed)
    used: set[int] = set()
    starts = [n for ns in graph.values() for n in ns]
    rng.shuffle(starts)
    sessions = []
    for start in starts:
        if start in used:
            continue
        t = triplets[start]
        turns, seen = [start], {t.source_id, str(t.target_id)}
        while len(turns) < max_turns:
            last = triplets[turns[-1]]
            options = [n for n in graph.get((last.dataset, str(last.target_id)), [])
                       if n not in used and n not in turns and str(triplets[n].target_id) not in seen]
            if not options:
                break
            turns.append(rng.choice(options))
            seen.add(str(triplets[turns[-1]].target_id))
        if len(turns) >= min_turns:
            used.update(turns)
            sessions.append(Session(t.dataset, tuple(turns)))
    return sessions


def session_lengths(sessions: Iterable[Session]) -> dict[int, int]:
    return dict(sorted(Counter(len(s) for s in sessions).items()))
