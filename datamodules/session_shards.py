"""Multi-turn sessions in the shard format: one session per sample, its turn structure explicit.

A session is a chain of products p0 → p1 → … → pT and one modification text per turn: turn t
(0-based) asks to go from p_t to p_{t+1}, so each turn's target is the next turn's reference (the
shopper clicked it). A split's sessions sit beside its triplets and gallery as
``{split}-sessions-NNNNNN.tar``; the manifest's split entry counts them (``sessions``) and their
lengths (``session_lengths``, turns → count). Every chain product is in the split's gallery, so
per-turn evaluation ranks each turn's query in the same gallery as single-turn evaluation.

Sample members: ``json`` = ``{"session": {"session_id", "dataset", "turns": [triplet, …]},
"products": [product meta of p0 … pT]}``, and ``p{k}v{i}.jpg``, view i of chain product k. A turn
record is a ``Triplet`` (its ``source_id`` p_t, its ``target_id`` p_{t+1}), so a session's turns
are also valid single-turn queries.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .batching import TRIPLET_KEYS, ImageTransform, TextMode, pick_text, require_keys, stack_views, views_of
from .fast_decode import CorruptSample, sample_where
from .schema import SchemaError, Triplet, check_key, safe_key
from .shards import ShardSetWriter

SESSION_KIND = "sessions"
MAX_TURNS = 8  # the shard format's bound; data builders make 2-5 turns (the literature's sessions)


@dataclass
class SessionRecord:
    """A chain of turns: ``turns[t].target_id == turns[t + 1].source_id``, no product twice."""

    session_id: str
    dataset: str
    turns: list[Triplet]

    def __post_init__(self) -> None:
        check_key(self.session_id, "session_id")
        check_key(self.dataset, "dataset")
        if not 1 <= len(self.turns) <= MAX_TURNS:
            raise SchemaError(f"session {self.session_id!r}: {len(self.turns)} turns; a session has 1 to {MAX_TURNS}")
        for a, b in zip(self.turns, self.turns[1:], strict=False):
            if a.target_id != b.source_id:
                raise SchemaError(f"session {self.session_id!r}: turn target {a.target_id!r} is not the next turn's "
                                  f"source {b.source_id!r}; each turn must start from the previous target")
        if any(t.dataset != self.dataset for t in self.turns):
            raise SchemaError(f"session {self.session_id!r}: turns from another dataset than {self.dataset!r}")
        chain = self.chain
        if len(set(chain)) != len(chain):
            raise SchemaError(f"session {self.session_id!r}: product visited twice in {chain}")

    @property
    def chain(self) -> list[str]:
        """p0 … pT: the start product, then each turn's target."""
        return [self.turns[0].source_id] + [str(t.target_id) for t in self.turns]

    @property
    def key(self) -> str:
        return safe_key(f"{self.dataset}--{self.session_id}")

    def meta(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "dataset": self.dataset, "turns": [t.meta() for t in self.turns]}


def write_session(writer: ShardSetWriter, record: SessionRecord,
                  products: Sequence[tuple[dict[str, Any], list[bytes]]]) -> None:
    """One session sample; ``products`` are the encoded chain products p0 … pT, in order."""
    if [m["product_id"] for m, _ in products] != record.chain:
        raise SchemaError(f"session {record.session_id!r}: products {[m['product_id'] for m, _ in products]} are not "
                          f"its chain {record.chain}")
    sample: dict[str, Any] = {"__key__": record.key,
                              "json": {"session": record.meta(), "products": [m for m, _ in products]}}
    for k, (_, views) in enumerate(products):
        sample.update({f"p{k}v{i}.jpg": b for i, b in enumerate(views)})
    writer.write(SESSION_KIND, sample)
    writer.session_lengths[len(record.turns)] = writer.session_lengths.get(len(record.turns), 0) + 1


def session_lengths_of(manifest_split: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in (manifest_split.get("session_lengths") or {}).items()}


class SessionExample:
    """Sample → dict for one session (a class so DataLoader workers can pickle it).

    ``products``: the chain's views per product (p0 … pT, stacked as the transform gives them);
    ``texts``: one modification text per turn; ``turns``: the triplet records; ``product_ids`` and
    ``chain_meta`` the chain's ids and product records. The text choice is keyed by seed, epoch and
    sample key, as ``TripletExample``'s.
    """

    def __init__(self, transform: ImageTransform, text_mode: TextMode, seed: int = 0) -> None:
        self.transform = transform
        self.text_mode = text_mode
        self.seed, self.epoch = seed, 0

    def for_epoch(self, epoch: int) -> SessionExample:
        out = SessionExample(self.transform, self.text_mode, self.seed)
        out.epoch = epoch
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = require_keys(sample.get("json"), ("session", "products"), "its json", sample)
        session = require_keys(meta["session"], ("session_id", "dataset", "turns"), "its json's 'session'", sample)
        turns = [require_keys(t, TRIPLET_KEYS, "a turn of its json's 'session'", sample) for t in session["turns"]]
        products = meta["products"]
        if not turns or len(products) != len(turns) + 1:
            raise CorruptSample(f"{sample_where(sample)}: {len(turns)} turns but {len(products)} chain products; "
                                "a session of T turns has T + 1")
        rng = random.Random(f"{self.seed}|{self.epoch}|{sample.get('__key__')}")
        return {
            "session_id": session["session_id"],
            "dataset": session["dataset"],
            "products": [stack_views(views_of(sample, f"p{k}v"), self.transform) for k in range(len(products))],
            "product_ids": [p["product_id"] for p in products],
            "texts": [pick_text(t, self.text_mode, rng) for t in turns],
            "turns": turns,
            "chain_meta": products,
        }


def collate_sessions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Sessions stay whole (lists per key): turn counts differ between sessions."""
    if not samples:
        return {"sessions": []}
    return {key: [s[key] for s in samples] for key in samples[0]}
