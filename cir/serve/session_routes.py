"""The HTTP routes of multi-turn sessions (``sessions.py`` says what a session is and how a turn is
answered):

    POST   /sessions               multipart: text, dataset, k, product_id or 1-5 images → turn 1
    POST   /sessions/{id}/turns    JSON {"text": ..., "clicked": {"dataset": ..., "product_id": ...} | null}
    GET    /sessions/{id}          the conversation so far: turns, texts, references, results
    DELETE /sessions/{id}

A clicked product becomes the reference of the turn it is sent with. Refusals: an unknown, expired,
evicted or deleted id is a 404 that says which; a turn past ``--max-turns`` a 422; a dialogue past
the model's context length, or a session larger than all of ``--session-mb``, a 413.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel, Field

from lightning_modules.families.procir.session_cache import SessionTooLong

from .batcher import MicroBatcher, QueueFull
from .engine import Answer, SearchEngine, SessionJob
from .engine import Query as EngineQuery
from .limits import BadInput, Limits
from .sessions import JOINED, KV_CACHE, Reference, Session, SessionStore, joined_text
from .sources import read_source


class Clicked(BaseModel):
    product_id: str = Field(description="a gallery product, usually one of the previous turn's results")
    dataset: str | None = Field(None, description="its dataset (default: the session's)")


class TurnRequest(BaseModel):
    text: str = Field(description="the next modification, e.g. 'and a back zipper'")
    clicked: Clicked | None = Field(None, description="the result the shopper clicked: the new reference")


def add_session_routes(app: FastAPI, engine: SearchEngine, batcher: MicroBatcher, limits: Limits,
                       store: SessionStore, image_url: Callable[[str, int, str], str],
                       dataset_of: Callable[[str | None], str]) -> None:
    mode = KV_CACHE if engine.sessions is not None else JOINED

    async def ask(job: EngineQuery | SessionJob) -> Answer:
        try:
            return await batcher(job, limits.timeout_s)
        except QueueFull as error:
            raise BadInput(503, f"the service is busy ({error}); retry shortly") from None
        except TimeoutError:
            raise BadInput(503, f"no answer within {limits.timeout_s:.0f} s; the service is overloaded") from None
        except SessionTooLong as error:
            raise BadInput(413, str(error)) from None

    async def take_turn(session: Session, text: str, reference: Reference | None, t0: float
                        ) -> tuple[Session, dict[str, Any]]:
        """Answers one turn; returns the session as it is after it (``session`` is left unchanged)
        and the response."""
        texts = [text] if reference is not None else [*session.texts, text]
        if session.mode == KV_CACHE:
            query_text = text
            answer = await ask(SessionJob(session.dataset, session.k, text,
                                          reference.views if reference is not None else None, session.state))
        else:  # the single-turn query of the current reference and the texts typed since it was set
            query_text = joined_text(texts)
            ref = reference or session.reference
            answer = await ask(EngineQuery(session.dataset, query_text, session.k, ref.views, ref.key, ref.caption))
        ds = session.dataset
        turn = {"turn": len(session.turns) + 1, "text": text, "query_text": query_text,
                "reference": reference.describe() if reference is not None else None,
                "results": [{"rank": r, "id": pid, "score": score, "image": image_url(ds, 0, pid)}
                            for r, (pid, score) in enumerate(answer.results, 1)]}
        current = reference or session.reference
        if session.mode == KV_CACHE:  # its views are in the model cache now: not kept twice
            current = dataclasses.replace(current, views=[])
        after = dataclasses.replace(session, reference=current, texts=texts, turns=[*session.turns, turn],
                                    state=answer.state if session.mode == KV_CACHE else None)
        body = {"session_id": session.id, **turn, "dataset": ds, "mode": session.mode, "cached": answer.cached,
                "tokens": after.tokens, "encode_ms": round(answer.encode_ms, 3),
                "total_ms": round(1000 * (time.perf_counter() - t0), 3)}
        return after, body

    @app.post("/sessions", status_code=201, summary="Start a multi-turn session: a reference product and a text")
    async def start_session(text: Annotated[str, Form(description="the first modification text")] = "",
                            dataset: Annotated[str | None, Form(description="the gallery searched")] = None,
                            k: Annotated[int, Form(description="results per turn")] = 10,
                            product_id: Annotated[str | None, Form(description="a gallery product to start "
                                                                                   "from")] = None,
                            source_caption: Annotated[str, Form(description="caption of uploaded views (models "
                                                                            "that read one)")] = "",
                            images: Annotated[list[UploadFile] | None, File(description="1-5 views to start "
                                                                                        "from")] = None,
                            ) -> dict[str, Any]:
        t0 = time.perf_counter()
        ds, text, k = dataset_of(dataset), limits.text(text), limits.k(k)
        views, key, caption = await read_source(engine, limits, ds, product_id, images, source_caption,
                                                field="product_id")
        reference = Reference(ds if product_id else None, product_id or None, views, caption, key)
        session = Session(store.new_id(), ds, k, mode, reference)
        after, body = await take_turn(session, text, reference, t0)
        store.add(after)
        return body

    @app.post("/sessions/{session_id}/turns", summary="The next turn of a session: a text, maybe a clicked result")
    async def next_turn(session_id: str, request: TurnRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        text = limits.text(request.text)
        async with store.get(session_id).lock:
            session = store.get(session_id)  # the latest: a turn that held the lock may have replaced it
            store.check_turns(session)
            reference = None
            if request.clicked is not None:
                ds, pid = dataset_of(request.clicked.dataset or session.dataset), request.clicked.product_id
                views, caption = await asyncio.to_thread(engine.store.source, ds, pid)
                reference = Reference(ds, pid, views, caption, engine.store.source_key(ds, pid))
            after, body = await take_turn(session, text, reference, t0)
            store.save(session, after)
            return body

    @app.get("/sessions/{session_id}", summary="A session's conversation so far")
    async def get_session(session_id: str) -> dict[str, Any]:
        session = store.get(session_id)
        return session.record(store.clock(), store.ttl_s)

    @app.delete("/sessions/{session_id}", summary="End a session and free what it holds")
    async def end_session(session_id: str) -> dict[str, Any]:
        session = store.delete(session_id)
        return {"session_id": session_id, "deleted": True, "turns": len(session.turns)}
