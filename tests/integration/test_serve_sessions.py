"""Multi-turn sessions of `cir serve` (issue 27) on in-process servers: ProCIR turns continue the
session's KV cache and rank as a brute-force search with the whole dialogue recomputed; CLIP4CIR
turns follow the joined-text rule; refusals (404, 422, 413), idle expiry, the byte bound, two turns
of one session at once, and the conversation page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from PIL import Image
from support.servers import in_process_server
from test_serve import data_args, get

from lightning_modules.families.procir.dialogue import Turn

ROOT = Path(__file__).resolve().parents[2]
DS = "synth_street"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    url: str
    engine: Any
    store: Any
    clock: Clock
    gallery: tuple[torch.Tensor, list[str]]  # the dataset's embeddings and ids, as evaluation embeds them


def call(method: str, url: str, body: dict[str, Any] | None = None, files: list[tuple[str, bytes]] | None = None,
         form: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    return asyncio.run(calls([(method, url, body, files, form)]))[0]


async def calls(requests: list[tuple[str, str, Any, Any, Any]]) -> list[tuple[int, dict[str, Any]]]:
    async def one(session: aiohttp.ClientSession, method: str, url: str, body: Any, files: Any, form: Any
                  ) -> tuple[int, dict[str, Any]]:
        data = None
        if form is not None:
            data = aiohttp.FormData()
            for key, value in form.items():
                data.add_field(key, str(value))
            for name, raw in files or []:
                data.add_field("images", raw, filename=name)
        async with session.request(method, url, json=body, data=data, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, *r) for r in requests)))


def start(url: str, text: str, pid: str | None = None, k: int = 6, files: list[tuple[str, bytes]] | None = None
          ) -> tuple[int, dict[str, Any]]:
    form = {"text": text, "dataset": DS, "k": k, **({"product_id": pid} if pid else {})}
    return call("POST", f"{url}/sessions", form=form, files=files)


def turn(url: str, sid: str, text: str, clicked: str | None = None) -> tuple[int, dict[str, Any]]:
    return call("POST", f"{url}/sessions/{sid}/turns", {"text": text, "clicked": {"product_id": clicked}
                                                          if clicked else None})


def brute_force(q: torch.Tensor, gallery: tuple[torch.Tensor, list[str]], k: int) -> list[tuple[str, float]]:
    emb, ids = gallery
    scores = emb @ q
    order = scores.argsort(descending=True)[:k]
    return [(ids[i], scores[i].item()) for i in order]


def assert_ranked(results: list[dict[str, Any]], expected: list[tuple[str, float]]) -> None:
    assert [r["id"] for r in results] == [pid for pid, _ in expected]
    assert all(abs(r["score"] - s) < 1e-4 for r, (_, s) in zip(results, expected, strict=True))


def served(exp: str, small_data: Path, **store: Any) -> Iterator[Served]:
    from cir.models import encode_gallery, load_model_and_data
    from cir.serve.engine import SearchEngine
    from cir.serve.sessions import SessionStore

    model, dm = load_model_and_data([str(ROOT / exp)], None, data_args(small_data))
    engine = SearchEngine(model, dm, "val", cache_mb=64)
    emb, ids, datasets = encode_gallery(model, dm, "val")
    keep = [i for i, d in enumerate(datasets) if d == DS]
    clock = Clock()
    sessions = SessionStore(store.get("budget", 2**30), store.get("ttl_s", 600), store.get("max_turns", 5), clock)
    with in_process_server(engine, sessions=sessions, max_wait_ms=1.0) as url:
        yield Served(url, engine, sessions, clock, (emb[keep].float(), [ids[i] for i in keep]))


@pytest.fixture(scope="module")
def procir(small_data: Path) -> Iterator[Served]:
    yield from served("experiments/demos/procir.yaml", small_data)


def first_products(url: str, n: int) -> list[str]:
    return json.loads(get(f"{url}/products/{DS}?limit={n}")[1])["ids"]


@pytest.mark.slow
def test_procir_turns_rank_as_the_full_dialogue_recomputed(procir: Served) -> None:
    pid = first_products(procir.url, 1)[0]
    status, one = start(procir.url, "like this but blue", pid)
    assert status == 201 and one["turn"] == 1 and one["mode"] == "kv-cache" and not one["cached"]
    sid = one["session_id"]
    status, two = turn(procir.url, sid, "with long sleeves")
    assert status == 200 and two["turn"] == 2 and two["cached"] and two["reference"] is None
    clicked = two["results"][1]["id"]
    status, three = turn(procir.url, sid, "and a back zipper", clicked)
    assert status == 200 and three["turn"] == 3 and three["reference"] == {"dataset": DS, "product_id": clicked}
    assert one["tokens"] < two["tokens"] < three["tokens"]
    # The reference: the whole session as one dialogue in one forward, then every gallery product scored.
    store = procir.engine.store
    turns = [Turn("like this but blue", store.source(DS, pid)[0]), Turn("with long sleeves"),
             Turn("and a back zipper", store.source(DS, clicked)[0])]
    with torch.no_grad():
        full = procir.engine.sessions.encode_session(turns)
    for answer, q in zip((one, two, three), full, strict=True):
        assert_ranked(answer["results"], brute_force(q, procir.gallery, 6))
    assert one["results"] != three["results"]
    # The conversation so far, as the page would show it again.
    status, record = call("GET", f"{procir.url}/sessions/{sid}")
    assert status == 200 and record["turn"] == 3 and record["reference"] == {"dataset": DS, "product_id": clicked}
    assert [t["text"] for t in record["turns"]] == ["like this but blue", "with long sleeves", "and a back zipper"]
    assert [t["reference"] for t in record["turns"]] == [{"dataset": DS, "product_id": pid}, None,
                                                         {"dataset": DS, "product_id": clicked}]
    assert [t["results"] for t in record["turns"]] == [a["results"] for a in (one, two, three)]
    assert record["tokens"] == three["tokens"] and record["bytes"] > 0
    health = json.loads(get(f"{procir.url}/health")[1])["sessions"]
    assert health["mode"] == "kv-cache" and health["entries"] >= 1 and health["bytes"] >= record["bytes"]


@pytest.mark.slow
def test_two_turns_sent_at_once_run_one_after_the_other(procir: Served) -> None:
    pid = first_products(procir.url, 2)[1]
    sid = start(procir.url, "make it red", pid)[1]["session_id"]
    url = f"{procir.url}/sessions/{sid}/turns"
    answers = asyncio.run(calls([("POST", url, {"text": t}, None, None) for t in ("in green", "with a hood")]))
    assert [s for s, _ in answers] == [200, 200] and sorted(a["turn"] for _, a in answers) == [2, 3]
    order = [a["text"] for _, a in sorted(answers, key=lambda x: x[1]["turn"])]
    views = procir.engine.store.source(DS, pid)[0]
    with torch.no_grad():
        full = procir.engine.sessions.encode_session([Turn("make it red", views), *map(Turn, order)])
    for (_, answer), text in zip(sorted(answers, key=lambda x: x[1]["turn"]), order, strict=True):
        assert_ranked(answer["results"], brute_force(full[order.index(text) + 1], procir.gallery, 6))


@pytest.mark.slow
def test_an_uploaded_start_and_every_refusal(procir: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    url, pid = procir.url, first_products(procir.url, 1)[0]
    view = get(f"{url}/images/{DS}/0/{pid}")[1]
    status, up = start(url, "like this but blue", files=[("front.jpg", view)])
    assert status == 201 and up["reference"] == {"upload": 1}
    cases = [
        (start(url, "x", pid, files=[("a.jpg", view)]), 400, "either product_id or images"),
        (start(url, "x"), 400, "no source: give product_id"),
        (start(url, "   ", pid), 400, "text is empty"),
        (start(url, "x", "p-nowhere"), 404, "no product 'p-nowhere'"),
        (turn(url, "made-up-id", "x"), 404, "no session 'made-up-id'"),
        (turn(url, up["session_id"], "x", "p-nowhere"), 404, "no product 'p-nowhere'"),
        (call("POST", f"{url}/sessions/{up['session_id']}/turns", {"clicked": None}), 422, "text"),
    ]
    for (status, body), expected, words in cases:
        assert (status, set(body)) == (expected, {"error"}) and words in body["error"], body
    # Turns past --max-turns: 422 naming the limit; the session is kept as it was.
    sid = up["session_id"]
    for n in range(2, 6):
        assert turn(url, sid, f"change {n}")[0] == 200
    status, body = turn(url, sid, "one more")
    assert status == 422 and "--max-turns 5" in body["error"] and "5 turns" in body["error"]
    # A dialogue past the model's context length: 413 naming the limit.
    sid = start(url, "make it red", pid)[1]["session_id"]
    tokens = call("GET", f"{url}/sessions/{sid}")[1]["tokens"]
    monkeypatch.setattr(procir.engine.sessions, "max_tokens", tokens + 20)
    status, body = turn(url, sid, "and now with long sleeves, a round neck, two pockets and a zipper at the back")
    assert status == 413 and f"at most {tokens + 20}" in body["error"]
    assert turn(url, sid, "red")[0] == 200  # a short turn still fits
    # Deleted, then asked for: a 404 that says so.
    assert call("DELETE", f"{url}/sessions/{sid}") == (200, {"session_id": sid, "deleted": True, "turns": 2})
    for status, body in (call("GET", f"{url}/sessions/{sid}"), call("DELETE", f"{url}/sessions/{sid}")):
        assert status == 404 and "was deleted" in body["error"]


@pytest.mark.slow
def test_idle_sessions_expire_and_the_byte_bound_evicts_the_least_recent(procir: Served) -> None:
    url, (a, b) = procir.url, first_products(procir.url, 2)
    old = start(url, "make it red", a)[1]["session_id"]
    procir.clock.now += 300
    fresh = start(url, "make it blue", b)[1]["session_id"]
    procir.clock.now += 301  # old: 601 s idle (ttl 600); fresh: 301 s
    status, body = call("GET", f"{url}/sessions/{old}")
    assert status == 404 and "expired after 600 s without a turn" in body["error"]
    assert turn(url, fresh, "with a hood")[0] == 200
    # Bytes: room for two sessions of this size, not three; the least recently used one goes.
    size = call("GET", f"{url}/sessions/{fresh}")[1]["bytes"]
    budget = procir.store.lru.budget
    procir.store.lru.budget = int(2.6 * size)
    try:
        first = start(url, "make it green", a)[1]["session_id"]
        assert turn(url, first, "with a hood")[0] == 200
        assert turn(url, fresh, "shorter")[0] == 200  # now used after `first`
        third = start(url, "make it pink", b)[1]["session_id"]
        assert turn(url, third, "with a hood")[0] == 200
        assert call("GET", f"{url}/sessions/{fresh}")[0] == 200 and call("GET", f"{url}/sessions/{third}")[0] == 200
        status, body = call("GET", f"{url}/sessions/{first}")
        assert status == 404 and "--session-mb" in body["error"]
        assert procir.store.lru.bytes <= procir.store.lru.budget and procir.store.lru.evictions >= 1
    finally:
        procir.store.lru.budget = budget


@pytest.mark.slow
def test_other_families_query_the_reference_with_the_texts_joined(small_data: Path) -> None:
    from cir.serve.engine import Query

    for s in served("experiments/demos/clip4cir.yaml", small_data):
        pid = first_products(s.url, 1)[0]
        status, one = start(s.url, "make it red", pid)
        sid = one["session_id"]
        _, two = turn(s.url, sid, "with long sleeves")
        clicked = two["results"][2]["id"]
        _, three = turn(s.url, sid, "and a hood", clicked)
        _, four = turn(s.url, sid, "shorter")
        assert status == 201 and one["mode"] == "joined" and four["turn"] == 4
        assert [a["query_text"] for a in (one, two, three, four)] == [
            "make it red", "make it red, with long sleeves", "and a hood", "and a hood, shorter"]
        # Each turn is the single-turn query of its reference and joined text, brute-forced here.
        model, dm = s.engine.model, s.engine.dm
        from datamodules.batching import collate, stack_views

        for answer, ref in ((one, pid), (two, pid), (three, clicked), (four, clicked)):
            views, caption = s.engine.store.source(DS, ref)
            batch = collate([{"source_images": stack_views(views, dm.image_transform), "text": answer["query_text"],
                              "source_caption": caption}])
            with torch.no_grad():
                q = model.encode_query(batch).float()[0]
            assert_ranked(answer["results"], brute_force(q, s.gallery, 6))
            single = s.engine.run([Query(DS, answer["query_text"], 6, views, None, caption)])[0]
            assert [r["id"] for r in answer["results"]] == [i for i, _ in single.results]


@pytest.mark.slow
def test_the_page_holds_a_conversation_in_headless_chromium(procir: Served, tmp_path: Path) -> None:
    """Three turns on one session, driven by the page's own JavaScript: each turn's results shown,
    a result clicked before turn 3 becomes its reference; the screenshot is kept for a look."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); see docs/serving/index.md")
    pid = first_products(procir.url, 1)[0]
    texts = ["like this but blue", "with long sleeves", "and a back zipper"]
    script = [("dataset", DS), ("source", pid), ("k", "5"), ("turn", texts[0]), ("turn", texts[1]), ("click", "2"),
              ("turn", texts[2])]
    page = f"{procir.url}/?{urllib.parse.urlencode(script)}"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=30000", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "conversation.png"
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    turns = re.findall(r'<div class="turn" data-turn="(\d)"(?: data-reference="([^"]*)")?>(.*?)</div></div>', dom)
    assert [int(n) for n, _, _ in turns] == [1, 2, 3], dom[-3000:]
    rows = [re.findall(r'<figure class="turn-result( chosen)?" data-id="([^"]+)"', body) for _, _, body in turns]
    assert [len(r) for r in rows] == [5, 5, 5]
    clicked = rows[1][1][1]
    assert [ref for _, ref, _ in turns] == [pid, "", clicked]  # turn 3 refines from the clicked result
    assert [[pid for chosen, pid in r if chosen] for r in rows] == [[], [clicked], []]  # marked in its row
    assert all(texts[i] in turns[i][2] for i in range(3)) and 'data-state="done"' in dom
    # The same conversation through the API gives the rows the page showed.
    sid = start(procir.url, texts[0], pid, k=5)[1]["session_id"]
    expected = [[r["id"] for r in a["results"]] for a in (
        call("GET", f"{procir.url}/sessions/{sid}")[1]["turns"][0], turn(procir.url, sid, texts[1])[1],
        turn(procir.url, sid, texts[2], clicked)[1])]
    assert [[pid for _, pid in r] for r in rows] == expected
    img = Image.open(shot).convert("RGB")
    # The chosen result's frame (#1a73e8) is on screen: the rows were drawn, not only the DOM built.
    blue = (0x1A, 0x73, 0xE8)
    frame = sum(1 for px in img.getdata() if all(abs(a - b) < 16 for a, b in zip(px, blue, strict=True)))
    assert frame > 100, f"no chosen-result frame in {shot}"
