"""ProCIR's dialogues (FashionMV paper, §4): documents, queries and caption forwards, with CoT.

- document: ``user: [views]`` → ``assistant: <think>…</think> <emb_all>`` → d
- single-turn query: ``user: [source views] + text`` → ``assistant: <emb_all>`` → q
- two-stage dialogue (MT): turn 1 as a document gives s, turn 2 ``user: text`` →
  ``assistant: <emb_all>`` gives q. Turn 1 is token for token a document, so by causality s is
  the source's gallery embedding.
- a multi-turn session continues the same dialogue: each turn is the MT pair (or, single-turn,
  one user message) for its reference and its text; a turn with no new reference is only the
  text pair (the shopper typed again without clicking a result). Its first turn is token for token
  the single-turn query, so turn 1 of a session scores as a one-turn query does.

CoT puts the product's long caption inside ``<think>`` (documents and turn 1), keeping ⌈ρ·n⌉ of
its tokens in order; evaluation never sees a caption.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...backbones.qwen import IM_END, PatchedImage
from ...backbones.qwen_chat import Dialogue, DialogueBuilder


def keep_tokens(ids: list[int], ratio: float, rng: random.Random) -> list[int]:
    """⌈ratio·n⌉ of ``ids`` chosen at random, in their original order (CoT progressive removal)."""
    k = min(len(ids), math.ceil(max(ratio, 0.0) * len(ids)))
    return [ids[i] for i in sorted(rng.sample(range(len(ids)), k))]


@dataclass(frozen=True)
class Turn:
    """One turn of a session: the modification text and, when the turn brings one, the reference
    product's views (turn 1's source; later, the result the shopper clicked). ``continued`` marks
    an increment built alone after a cached turn (its first tokens close that turn)."""

    text: str
    reference: list[PatchedImage] | None = None
    continued: bool = False


class ProCIRDialogues:
    """Builds ProCIR's dialogues on a ``DialogueBuilder``; ``thought`` supplies the CoT tokens."""

    def __init__(self, builder: DialogueBuilder, two_stage: bool) -> None:
        self.builder = builder
        self.two_stage = two_stage

    def document(self, views: list[PatchedImage], thought: list[int] = ()) -> Dialogue:
        d = self.builder
        return d.assistant(d.user(Dialogue(), views), thought=list(thought), close=False)

    def query(self, views: list[PatchedImage], text: str, thought: list[int] = ()) -> Dialogue:
        d = self.builder
        if self.two_stage:
            seq = d.assistant(d.user(Dialogue(), views), thought=list(thought))
            return d.assistant(d.user(seq, text=text), close=False)
        return d.assistant(d.user(Dialogue(), views, text), close=False)

    def session_turn(self, seq: Dialogue, turn: Turn, thought: list[int] = ()) -> Dialogue:
        """Appends one turn to a session; a non-empty ``seq`` ends at the previous turn's query
        ``<emb_all>`` (left open), which is closed first. On an empty ``seq`` with ``continued``
        the closing tokens start it: the increment a cached session runs."""
        d = self.builder
        if seq.ids or turn.continued:
            d._special(seq, IM_END, False)
            d._add(seq, d._text_ids("\n"), False)
        if turn.reference is None:
            return d.assistant(d.user(seq, text=turn.text), close=False)
        if self.two_stage:
            seq = d.assistant(d.user(seq, turn.reference), thought=list(thought))
            return d.assistant(d.user(seq, text=turn.text), close=False)
        return d.assistant(d.user(seq, turn.reference, turn.text), close=False)

    def session(self, turns: Sequence[Turn], thoughts: Sequence[list[int]] | None = None) -> tuple[Dialogue, list[int]]:
        """The whole session as one dialogue, and the index in ``emb_positions`` of each turn's
        query ``<emb_all>`` (the last of each turn; an MT reference turn adds its s before it)."""
        if not turns or turns[0].reference is None:
            raise ValueError("a session starts with a reference product: its first turn needs views")
        seq, queries = Dialogue(), []
        for t, turn in enumerate(turns):
            seq = self.session_turn(seq, turn, list(thoughts[t]) if thoughts else [])
            queries.append(len(seq.emb_positions) - 1)
        return seq, queries

    def caption(self, text: str) -> Dialogue:
        """Caption alignment's text-only forward: ``[T_cap; <emb_all>]``."""
        return self.builder.text_embedding(text)


def caption_text(product: dict[str, Any] | None, kind: str) -> str:
    """The ``kind`` (long/short) caption of a product record, the short one when it lacks it."""
    product = product or {}
    return product.get(f"{kind}_caption") or product.get("short_caption") or ""
