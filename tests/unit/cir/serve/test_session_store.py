"""The session store of ``cir serve`` (issue 27): idle expiry, the byte bound (least recently used
first), deletion, a turn that cannot bring back an ended session, the turn limit, and 404s that
say why a session is gone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from cir.serve.limits import BadInput
from cir.serve.lru import BytesLRU
from cir.serve.sessions import JOINED, KV_CACHE, Reference, Session, SessionStore, UnknownSession, joined_text


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def session(store: SessionStore, cache_bytes: int = 0, mode: str = KV_CACHE) -> Session:
    state = SimpleNamespace(nbytes=cache_bytes, tokens=10) if mode == KV_CACHE else None
    return Session(store.new_id(), "shop", 5, mode, Reference("shop", "p1", []), ["make it red"], state,
                   [{"turn": 1, "text": "make it red"}])


def test_a_session_counts_its_cache_views_and_record() -> None:
    store = SessionStore(10**6)
    s = session(store, cache_bytes=1000)
    record = len('[{"turn": 1, "text": "make it red"}]') + len("make it red")
    assert s.nbytes() == 1000 + record
    joined = session(store, mode=JOINED)
    joined.reference = Reference(None, None, [Image.new("RGB", (10, 20)), Image.new("L", (4, 4))])
    assert joined.nbytes() == 10 * 20 * 3 + 16 + record
    assert joined.reference.describe() == {"upload": 2} and s.reference.describe() == {"dataset": "shop",
                                                                                      "product_id": "p1"}
    assert joined_text(["like this but blue", "with long sleeves"]) == "like this but blue, with long sleeves"


def test_idle_sessions_expire_and_the_404_says_so() -> None:
    clock = Clock()
    store = SessionStore(10**6, ttl_s=60, clock=clock)
    old, fresh = session(store), session(store)
    store.add(old)
    clock.now = 30
    store.add(fresh)
    clock.now = 61  # old: 61 s idle, fresh: 31 s
    with pytest.raises(UnknownSession, match=r"expired after 60 s without a turn \(--session-ttl-s\)"):
        store.get(old.id)
    assert store.get(fresh.id) is fresh and fresh.last_used == 61
    clock.now = 120  # used at 61: 59 s idle, still there
    assert store.get(fresh.id) is fresh
    assert store.stats()["expired"] == 1 and store.stats()["entries"] == 1
    with pytest.raises(UnknownSession, match=r"no session 'never': start a new one with POST /sessions") as error:
        store.get("never")
    assert error.value.status == 404


def test_the_byte_bound_evicts_the_least_recently_used_session() -> None:
    store = SessionStore(3000)
    a, b, c = (session(store, cache_bytes=1200) for _ in range(3))
    for s in (a, b):
        store.add(s)
    store.get(a.id)  # a is now the most recent
    store.add(c)  # 3 × ~1250 bytes > 3000: the least recently used (b) goes
    assert store.get(a.id) is a and store.get(c.id) is c
    with pytest.raises(UnknownSession, match=r"dropped to keep sessions within --session-mb"):
        store.get(b.id)
    assert store.lru.bytes <= 3000 and store.lru.evictions == 1
    with pytest.raises(BadInput, match=r"more than all of --session-mb \(3000 bytes\)") as error:
        store.add(session(store, cache_bytes=5000))
    assert error.value.status == 413


def test_a_turn_replaces_its_session_but_never_brings_back_an_ended_one() -> None:
    store = SessionStore(10**6, max_turns=2)
    before = session(store)
    store.add(before)
    store.check_turns(before)
    after = Session(**{**before.__dict__, "turns": [*before.turns, {"turn": 2}]})
    store.save(before, after)
    assert store.get(before.id) is after
    with pytest.raises(BadInput, match=r"has had 2 turns, the most allowed \(--max-turns 2\)") as error:
        store.check_turns(after)
    assert error.value.status == 422
    with pytest.raises(UnknownSession):  # a stale turn (its session was replaced meanwhile) is refused
        store.save(before, after)
    assert store.delete(after.id) is after
    with pytest.raises(UnknownSession, match="was deleted"):
        store.save(after, after)
    with pytest.raises(UnknownSession, match="was deleted"):
        store.delete(after.id)
    assert store.stats()["deleted"] == 1 and store.stats()["entries"] == 0


def test_the_lru_pops_peeks_and_lists_keys() -> None:
    lru: BytesLRU[str] = BytesLRU(100, size_of=len)
    lru.put("a", "x" * 10)
    lru.put("b", "y" * 20)
    assert lru.peek("a") == "x" * 10 and lru.keys() == ["a", "b"] and lru.hits == 0  # peek changes nothing
    assert lru.pop("a") == "x" * 10 and lru.bytes == 20 and lru.pop("a") is None and lru.keys() == ["b"]
