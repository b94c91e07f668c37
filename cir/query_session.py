"""``cir query --session``: one shopper's multi-turn session at the terminal.

The first text is turn 1, from the ``--images`` product; each later line is the next turn. ``:click
N`` makes result N of the last turn the next turn's reference, ``:new`` starts a new session from
``--images``. A ProCIR model with the two-stage dialogue continues the session's KV cache (each turn
runs only its own tokens: ``SessionEncoder``); every other model answers turn t with the single-turn
query of the current reference and the texts typed since that reference was set, joined by ", "
(the rule ``cir serve``'s sessions follow).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from datamodules.batching import collate, stack_views
from lightning_modules.backbones.images import open_upright
from lightning_modules.core.embedding import embed_queries
from lightning_modules.families.procir import ProCIR
from lightning_modules.families.procir.session_cache import SessionEncoder, SessionTooLong

from .serve.gallery import GalleryStore
from .serve.sessions import joined_text

Views = Sequence[Image.Image | str | Path]
Rank = Callable[[torch.Tensor, int], list[tuple[str, float]]]  # q, k -> the top-k (id, score)
Turn = Callable[[Any, str, "Reference | None"], tuple[torch.Tensor, Any]]  # (state, text, new reference) -> q, state
SESSION_HELP = """\
  :click N  make result N of the last turn the next turn's reference
  :new      start a new session from --images"""


class Refused(Exception):
    """A turn or command that cannot be done; the prompt says why and goes on."""


@dataclass(frozen=True)
class Reference:
    """What a turn refines: the ``--images`` product or a clicked result (its views and caption)."""

    name: str
    views: Views
    caption: str = ""


class CachedTurns:
    """Turns that continue a ProCIR session's KV cache; the state is its ``SessionState``."""

    def __init__(self, encoder: SessionEncoder) -> None:
        self.encoder = encoder

    def __call__(self, state: Any, text: str, reference: Reference | None) -> tuple[torch.Tensor, Any]:
        try:
            if state is None:
                assert reference is not None
                return self.encoder.start_session(reference.views, text)
            return self.encoder.extend(state, text, reference.views if reference is not None else None)
        except SessionTooLong as error:
            raise Refused(f"{error} (:new)") from None


@dataclass(frozen=True)
class Joined:
    reference: Reference
    texts: tuple[str, ...]  # typed since the reference was set


class JoinedTurns:
    """Turns of a model without a session cache: the single-turn query of the reference and the
    texts typed since it was set; ``embed(views, caption, text)`` is that query's q."""

    def __init__(self, embed: Callable[[Views, str, str], torch.Tensor]) -> None:
        self.embed = embed

    def __call__(self, state: Joined | None, text: str, reference: Reference | None) -> tuple[torch.Tensor, Joined]:
        if reference is None:
            assert state is not None
            reference, texts = state.reference, (*state.texts, text)
        else:
            texts = (text,)
        return self.embed(reference.views, reference.caption, joined_text(list(texts))), Joined(reference, texts)


class Conversation:
    """The prompt's search (``text, k -> results, ms``) as turns of one session, with ``click``
    and ``new`` as its commands; ``product(id)`` reads a clicked result's views and caption."""

    def __init__(self, start: Reference, turn: Turn, rank: Rank,
                 product: Callable[[str], tuple[list[Image.Image], str]]) -> None:
        self.start, self.turn, self.rank, self.product = start, turn, rank, product
        self.state: Any = None
        self.pending: Reference | None = None
        self.last: list[tuple[str, float]] = []
        self.turns = 0
        self.source = start.name

    def __call__(self, text: str, k: int) -> tuple[list[tuple[str, float]], float]:
        t0 = time.perf_counter()
        reference = self.start if self.state is None else self.pending
        q, state = self.turn(self.state, text, reference)
        results = self.rank(q, k)
        self.state, self.pending, self.last = state, None, results
        self.turns += 1
        self.source = reference.name if reference is not None else ""
        return results, 1000 * (time.perf_counter() - t0)

    def heading(self, text: str, ms: float) -> str:
        """The line above a turn's results."""
        return f"turn {self.turns} [{ms:.1f} ms] {text!r}" + (f" from {self.source}" if self.source else "")

    def click(self, arg: str) -> str:
        if not self.last:
            raise Refused("no results yet: type the first turn's text")
        if not arg.strip().isdigit() or not 1 <= int(arg) <= len(self.last):
            raise Refused(f":click {arg.strip()}: give a result's rank, 1 to {len(self.last)}")
        pid = self.last[int(arg) - 1][0]
        views, caption = self.product(pid)
        self.pending = Reference(pid, views, caption)
        return f"result {int(arg)} ({pid}) is the next turn's reference"

    def new(self, arg: str) -> str:
        self.state, self.pending, self.last, self.turns = None, None, [], 0
        return f"new session: the next text is turn 1 from {self.start.name}"


def session_of(model: Any, dm: Any, images: list[str], split: str, dataset: str, rank: Rank
               ) -> tuple[Conversation, str]:
    """The session of ``cir query --session``: from the ``images`` files, clicked results read from
    the shards of the ``split`` gallery of ``dataset`` (the one ranked); and a line saying how its
    turns are answered."""
    shards: list[GalleryStore] = []

    def product(pid: str) -> tuple[list[Image.Image], str]:
        if not shards:  # opened at the first click: a session without one never reads the shards
            shards.append(GalleryStore(dm.data_dir, split, getattr(dm, "captions", None)))
        return shards[0].source(dataset, pid)

    if isinstance(model, ProCIR) and model.two_stage_dialogue and model.view_strategy == "joint":
        encoder = SessionEncoder(model)
        how = f"KV cache (each turn runs only its own tokens; at most {encoder.max_tokens} in a session)"
        return Conversation(Reference("--images", list(images)), CachedTurns(encoder), rank, product), how

    def embed(views: Views, caption: str, text: str) -> torch.Tensor:
        pil = [open_upright(v) if isinstance(v, str | Path) else v for v in views]
        batch = collate([{"source_images": stack_views(pil, dm.image_transform), "text": text,
                          "source_caption": caption}])
        return next(embed_queries(model, [batch]))[0][0]

    how = "no cache for this model: each turn is the reference's query with the texts since it was set, joined"
    return Conversation(Reference("--images", list(images)), JoinedTurns(embed), rank, product), how

