"""The HTTP side of ``cir serve``: routes, input checks and one-line errors (FastAPI, OpenAPI at /docs).

    GET  /                                      the page (``page.html``)
    GET  /health                                model, galleries, queue, batches and cache counters
    GET  /datasets                              each dataset's gallery size
    GET  /products/{dataset}?offset=&limit=     gallery ids, a page at a time
    GET  /products/{dataset}/{id}               one product's metadata and captions
    GET  /images/{dataset}/{n}/{id}             its n-th view, the bytes stored in the shard
    GET  /examples/{dataset}?n=                 queries of the split's triplets (source, text, target)
    POST /search                                multipart: text, dataset, k, source_id or 1-5 images
    POST /products                              multipart: product_id, dataset, 1-5 images, category, title
    DELETE /products/{dataset}/{id}             (both writes need the API key: ``writes.py``)
    POST /sessions, POST /sessions/{id}/turns,  multi-turn sessions (``session_routes.py``)
    GET|DELETE /sessions/{id}

Ids may hold slashes (FashionMV's nested ids), so they come last in a path. Every refusal is a 4xx
with ``{"error": "<one line>"}``; only a fault of the model itself is a 500.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .batcher import MicroBatcher, QueueFull
from .engine import ProductJob, SearchEngine, SessionJob
from .engine import Query as EngineQuery
from .gallery import UnknownProduct
from .limits import BadInput, Limits
from .session_routes import add_session_routes
from .sessions import SessionStore
from .sources import read_source
from .uploads import UploadStore
from .writes import WriteGuard, Writer, add_write_routes, writes_off


def image_url(dataset: str, n: int, product_id: str) -> str:
    return f"/images/{quote(dataset, safe='')}/{n}/{quote(product_id, safe='/')}"


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class BodyLimit:
    """Refuses a POST without a Content-Length or with a Transfer-Encoding (411), or announcing
    more than the limit (413), before any of its body is read; what a client sends beyond its
    announced length is cut off by the server's HTTP parser."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            reason = None
            if b"transfer-encoding" in headers:  # the server would frame the body by it, past any length
                status, reason = 411, "send the request with a Content-Length header and no Transfer-Encoding"
            elif length is None or not length.isdigit():
                status, reason = 411, "send the request with a Content-Length header"
            elif int(length) > self.max_bytes:
                status, reason = 413, f"request of {int(length)} bytes; at most {self.max_bytes} are accepted"
            if reason is not None:
                await _error(status, reason)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: SearchEngine, limits: Limits | None = None, max_batch: int = 8,
               max_wait_ms: float = 5.0, max_queue: int = 256, api_key: str | None = None,
               uploads: UploadStore | None = None, writes_refused: str | None = None,
               compact_after: int = 10_000, sessions: SessionStore | None = None) -> FastAPI:
    """The service. ``api_key`` (``CIR_API_KEY``) turns the write routes on, given a store that keeps
    changes and ``uploads`` for their photos; ``writes_refused`` says why they stay off otherwise.
    ``sessions`` keeps the multi-turn sessions (default: 1 GiB, 30 min idle, 5 turns)."""
    limits = limits or Limits()
    sessions = sessions or SessionStore(1024 * 2**20)
    batcher: MicroBatcher[EngineQuery | ProductJob | SessionJob, Any] = MicroBatcher(
        engine.run, max_batch, max_wait_ms / 1000, max_queue)
    off = writes_off(engine, api_key, writes_refused)
    writer = Writer(engine, uploads, compact_after)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()
        writer.close()

    app = FastAPI(title="fashion-cir retrieval", version="1", lifespan=lifespan,
                  description="Composed image retrieval over a trained model's gallery: a source product (gallery "
                              "id or uploaded views) plus a modification text → the top-k products.")
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(WriteGuard, api_key=api_key, off=off)  # added last, so it answers first

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, error: BadInput) -> JSONResponse:
        return _error(error.status, error.reason)

    @app.exception_handler(UnknownProduct)
    async def unknown(_: Request, error: UnknownProduct) -> JSONResponse:
        return _error(404, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        reason = error.detail if isinstance(error.detail, str) else "bad request"
        return _error(error.status_code, "no such page: see /docs for the routes" if error.status_code == 404
                      and reason == "Not Found" else reason)

    @app.exception_handler(Exception)
    async def fault(_: Request, error: Exception) -> JSONResponse:
        # Not the client's doing (a model or data fault): say what broke, in one line, and keep serving.
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _error(500, f"{type(error).__name__}: {first}"[:300])

    def dataset_of(name: str | None) -> str:
        if name is None or name == "":
            if len(engine.datasets) == 1:
                return engine.datasets[0]
            raise BadInput(400, f"dataset is missing; this service holds {engine.datasets}")
        if name not in engine.datasets:
            raise BadInput(404, f"unknown dataset {name!r}; this service holds {engine.datasets}")
        return name

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness, model, galleries, batching and cache counters")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": type(engine.model).__name__, "split": engine.split,
                "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "store": type(engine.gallery).__name__, "writes": off or "on",
                "changes_not_compacted": getattr(engine.gallery, "pending", None),
                "datasets": {d: engine.gallery_size(d) for d in engine.datasets},
                "turn1_cache": engine.cache.stats() if engine.caches_turn1 else None,
                "sessions": {"mode": "kv-cache" if engine.sessions is not None else "joined", **sessions.stats()},
                "batching": batcher.stats()}

    @app.get("/datasets", summary="The datasets and their gallery sizes")
    async def datasets() -> list[dict[str, Any]]:
        return [{"name": d, "gallery_size": engine.gallery_size(d)} for d in engine.datasets]

    @app.get("/products/{dataset}", summary="Gallery ids of a dataset, a page at a time")
    async def product_ids(dataset: str, offset: Annotated[int, Query(ge=0)] = 0,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        ids = engine.store.ids(dataset_of(dataset))
        return {"dataset": dataset, "total": len(ids), "offset": offset, "ids": ids[offset: offset + limit]}

    @app.get("/products/{dataset}/{product_id:path}", summary="One product: metadata, captions, view count")
    async def product(dataset: str, product_id: str) -> dict[str, Any]:
        out = await asyncio.to_thread(engine.store.describe, dataset_of(dataset), product_id)
        out["images"] = [image_url(dataset, n, product_id) for n in range(out["views"])]
        return out

    @app.get("/images/{dataset}/{n}/{product_id:path}", summary="A product's n-th view as stored in the shard",
             response_class=Response)
    async def image(dataset: str, n: int, product_id: str) -> Response:
        data, media = await asyncio.to_thread(engine.store.view_image, dataset_of(dataset), product_id, n)
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/examples/{dataset}", summary="Queries from the split's triplets, with their targets")
    async def example_queries(dataset: str, n: Annotated[int, Query(ge=1, le=100)] = 24) -> list[dict[str, Any]]:
        return await asyncio.to_thread(engine.store.examples, dataset_of(dataset), n)

    @app.post("/search", summary="Top-k gallery products for a source and a modification text")
    async def search(text: Annotated[str, Form(description="the modification text")] = "",
                     dataset: Annotated[str | None, Form(description="the gallery searched")] = None,
                     k: Annotated[int, Form(description="results wanted")] = 10,
                     source_id: Annotated[str | None, Form(description="a gallery product as the source")] = None,
                     source_caption: Annotated[str, Form(description="caption of uploaded views (models that "
                                                                     "read one)")] = "",
                     images: Annotated[list[UploadFile] | None, File(description="1-5 views of the source")] = None,
                     ) -> dict[str, Any]:
        t0 = time.perf_counter()
        ds, text, k = dataset_of(dataset), limits.text(text), limits.k(k)
        views, key, caption = await read_source(engine, limits, ds, source_id, images, source_caption)
        try:
            answer = await batcher(EngineQuery(ds, text, k, views, key, caption), limits.timeout_s)
        except QueueFull as error:
            raise BadInput(503, f"the service is busy ({error}); retry shortly") from None
        except TimeoutError:
            raise BadInput(503, f"no answer within {limits.timeout_s:.0f} s; the service is overloaded") from None
        return {"dataset": ds, "text": text, "k": k, "source_id": source_id, "cached": answer.cached,
                "batch_size": answer.batch_size, "encode_ms": round(answer.encode_ms, 3),
                "total_ms": round(1000 * (time.perf_counter() - t0), 3),
                "results": [{"rank": r, "id": pid, "score": score, "image": image_url(ds, 0, pid)}
                            for r, (pid, score) in enumerate(answer.results, 1)]}

    add_write_routes(app, engine, batcher, limits, writer, image_url)
    add_session_routes(app, engine, batcher, limits, sessions, image_url, dataset_of)
    return app
