"""Multi-turn search sessions of ``cir serve``: what a session holds, and the store that keeps them.

A shopper refines a search over several turns ("like this but blue" → "with long sleeves" → clicks
a result → "and a back zipper"). Each turn is answered one of two ways:

- ``kv-cache`` (ProCIR with the two-stage dialogue, views embedded jointly): the session is one
  continuing dialogue; the state after each turn (the model's cache, ``SessionState``) lets the
  next turn run only its own tokens (``SessionEncoder.extend``); a clicked result's views become
  part of the next turn's user message.
- ``joined`` (every other model): turn t's query is the single-turn query of the current reference
  (the clicked product, else the previous turn's reference) with the texts typed since that
  reference was set joined by ", ", answered by the engine's single-turn path.

The store bounds sessions by bytes (``BytesLRU``: the least recently used go first), by idle time
(``ttl_s``) and by turns (``max_turns``). It remembers why a recent session ended, so a client
asking for it learns whether it expired, was evicted or deleted. Its methods take a lock; the HTTP
routes (``session_routes.py``) also hold a per-session lock across a turn, so two turns of one
session never run on the same state at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .limits import BadInput
from .lru import BytesLRU

KV_CACHE, JOINED = "kv-cache", "joined"
JOIN = ", "
ENDED_REMEMBERED = 4096  # ids whose ending a 404 can still explain
NEW_SESSION = "start a new one with POST /sessions"


def joined_text(texts: list[str]) -> str:
    """The single-turn text of a ``joined`` session: the texts since its reference was set."""
    return JOIN.join(texts)


@dataclass
class Reference:
    """What a turn searches from: a gallery product (``dataset``, ``product_id``) or uploaded views."""

    dataset: str | None
    product_id: str | None
    views: list[Image.Image]
    caption: str = ""
    key: Hashable | None = None  # the engine's turn-1 cache key

    def describe(self) -> dict[str, Any]:
        if self.product_id is None:
            return {"upload": len(self.views)}
        return {"dataset": self.dataset, "product_id": self.product_id}


@dataclass
class Session:
    id: str
    dataset: str
    k: int
    mode: str
    reference: Reference
    texts: list[str] = field(default_factory=list)  # typed since the reference was set (``joined``)
    state: Any = None  # the model's SessionState after the last turn (``kv-cache``)
    turns: list[dict[str, Any]] = field(default_factory=list)
    last_used: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def tokens(self) -> int | None:
        return self.state.tokens if self.state is not None else None

    def nbytes(self) -> int:
        """What the session holds: the model cache, the reference's decoded views (a ``kv-cache``
        session drops them once they are in the cache) and its turns' record."""
        cache = self.state.nbytes if self.state is not None else 0
        views = sum(img.width * img.height * len(img.getbands()) for img in self.reference.views)
        return cache + views + len(json.dumps(self.turns)) + sum(len(t) for t in self.texts)

    def record(self, now: float, ttl_s: float) -> dict[str, Any]:
        """The conversation so far, as ``GET /sessions/{id}`` shows it."""
        return {"session_id": self.id, "dataset": self.dataset, "k": self.k, "mode": self.mode,
                "turn": len(self.turns), "reference": self.reference.describe(), "tokens": self.tokens,
                "bytes": self.nbytes(), "expires_in_s": round(max(0.0, ttl_s - (now - self.last_used)), 3),
                "turns": self.turns}


class UnknownSession(BadInput):
    """A session id the store does not hold (never did, expired, evicted or deleted): a 404."""

    def __init__(self, reason: str) -> None:
        super().__init__(404, reason)


class SessionStore:
    """Sessions by id, at most ``budget_bytes`` in all, each dropped after ``ttl_s`` idle seconds."""

    def __init__(self, budget_bytes: int, ttl_s: float = 1800.0, max_turns: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_turns < 1 or budget_bytes <= 0:
            raise ValueError(f"sessions need ttl_s > 0, max_turns >= 1 and a budget > 0 (got {ttl_s}, {max_turns}, "
                             f"{budget_bytes})")
        self.lru: BytesLRU[Session] = BytesLRU(budget_bytes, size_of=Session.nbytes)
        self.ttl_s, self.max_turns, self.clock = float(ttl_s), int(max_turns), clock
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.started = self.expired = self.deleted = 0

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)  # unguessable: a session shows the shopper's uploaded photos

    def _end(self, sid: str, why: str) -> None:
        self._ended[sid] = why
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def _sweep(self, now: float) -> None:
        for sid in self.lru.keys():  # least recently used first: stop at the first one still fresh
            session = self.lru.peek(sid)
            if session is None or now - session.last_used <= self.ttl_s:
                break
            self.lru.pop(sid)
            self.expired += 1
            self._end(sid, f"session {sid!r} expired after {self.ttl_s:g} s without a turn (--session-ttl-s); "
                           f"{NEW_SESSION}")

    def _put(self, session: Session) -> None:
        before = set(self.lru.keys())
        if not self.lru.put(session.id, session):
            raise BadInput(413, f"this session holds {session.nbytes()} bytes, more than all of --session-mb "
                                f"({self.lru.budget} bytes): raise --session-mb")
        for sid in before - set(self.lru.keys()):
            self._end(sid, f"session {sid!r} was dropped to keep sessions within --session-mb "
                           f"({self.lru.budget / 2**20:g} MiB); {NEW_SESSION}")

    def get(self, sid: str) -> Session:
        """The live session ``sid`` (now its most recent use), or ``UnknownSession`` saying why not."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            session = self.lru.get(sid)
            if session is None:
                raise UnknownSession(self._ended.get(sid) or f"no session {sid!r}: {NEW_SESSION}")
            session.last_used = now
            return session

    def add(self, session: Session) -> None:
        """Keep a session whose first turn was answered."""
        with self._lock:
            session.last_used = self.clock()
            self._sweep(session.last_used)
            self._put(session)
            self.started += 1

    def save(self, before: Session, after: Session) -> None:
        """Replace ``before`` by ``after`` (the session after a turn); ``UnknownSession`` when it
        ended while the model answered (a DELETE, an expiry): a turn never brings a session back.
        When ``after`` alone exceeds the budget (a 413), ``before`` stays."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            if self.lru.peek(before.id) is not before:
                raise UnknownSession(self._ended.get(before.id) or f"no session {before.id!r}: {NEW_SESSION}")
            after.last_used = now
            self._put(after)

    def delete(self, sid: str) -> Session:
        with self._lock:
            self._sweep(self.clock())
            session = self.lru.pop(sid)
            if session is None:
                raise UnknownSession(self._ended.get(sid) or f"no session {sid!r}: {NEW_SESSION}")
            self.deleted += 1
            self._end(sid, f"session {sid!r} was deleted; {NEW_SESSION}")
            return session

    def check_turns(self, session: Session) -> None:
        if len(session.turns) >= self.max_turns:
            raise BadInput(422, f"session {session.id!r} has had {len(session.turns)} turns, the most allowed "
                                f"(--max-turns {self.max_turns}); {NEW_SESSION}")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._sweep(self.clock())
            return {**self.lru.stats(), "started": self.started, "expired": self.expired, "deleted": self.deleted,
                    "ttl_s": self.ttl_s, "max_turns": self.max_turns}
