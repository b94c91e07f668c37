"""ProCIR's dialogues (FashionMV paper, §4): documents, queries and caption forwards, with CoT.

- document: ``user: [views]`` → ``assistant: <think>…</think> <emb_all>`` → d
- single-turn query: ``user: [source views] + text`` → ``assistant: <emb_all>`` → q
- two-stage dialogue (MT): turn 1 as a document gives s, turn 2 ``user: text`` →
  ``assistant: <emb_all>`` gives q. Turn 1 is token for token a document, so by causality s is
  the source's gallery embedding.

CoT puts the product's long caption inside ``<think>`` (documents and turn 1), keeping ⌈ρ·n⌉ of
its tokens in order; evaluation never sees a caption.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ...backbones.qwen import PatchedImage
from ...backbones.qwen_chat import Dialogue, DialogueBuilder


def keep_tokens(ids: list[int], ratio: float, rng: random.Random) -> list[int]:
    """⌈ratio·n⌉ of ``ids`` chosen at random, in their original order (CoT progressive removal)."""
    k = min(len(ids), math.ceil(max(ratio, 0.0) * len(ids)))
    return [ids[i] for i in sorted(rng.sample(range(len(ids)), k))]


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

    def caption(self, text: str) -> Dialogue:
        """Caption alignment's text-only forward: ``[T_cap; <emb_all>]``."""
        return self.builder.text_embedding(text)


def caption_text(product: dict[str, Any] | None, kind: str) -> str:
    """The ``kind`` (long/short) caption of a product record, the short one when it lacks it."""
    product = product or {}
    return product.get(f"{kind}_caption") or product.get("short_caption") or ""
