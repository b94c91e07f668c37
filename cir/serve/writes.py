"""Changes to the gallery while it is served: ``POST /products`` and ``DELETE /products/{dataset}/{id}``.

Writes need the key in ``CIR_API_KEY`` (sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``,
compared in constant time). A request without it, or with another, gets 401 before its body is
read; a server started without the variable, or over a gallery that cannot keep changes (one
embedded at start-up lives in memory only), answers every write with 403 and the reason. Reads
stay open.

A product's photos are embedded by the model worker (batched with queries), saved where the page
shows them, and then written to the store, which returns only once the change is durable; the
answer comes after that, and the next query sees the product. Writes run one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse

from .batcher import MicroBatcher, QueueFull
from .engine import ProductJob, SearchEngine
from .gallery import UnknownProduct
from .limits import BadInput, Limits
from .uploads import UploadStore

API_KEY_ENV = "CIR_API_KEY"
NEW_DATASET = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ID_CHARS = 256
FORMATS = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"))


def extension(data: bytes) -> str:
    """The file extension of an image already checked to be a JPEG, PNG or WebP."""
    for magic, ext in FORMATS:
        if data.startswith(magic):
            return ext
    return "webp"


def product_id_of(raw: str) -> str:
    """An id as given, or a 400 naming what is wrong with it. Slashes are allowed (nested ids)."""
    if not raw or raw != raw.strip():
        raise BadInput(400, f"product_id {raw!r}: give a non-empty id without leading or trailing spaces")
    if len(raw) > MAX_ID_CHARS:
        raise BadInput(400, f"product_id has {len(raw)} characters; at most {MAX_ID_CHARS} are accepted")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadInput(400, "product_id holds control characters; use printable ones")
    return raw


def writes_off(engine: SearchEngine, api_key: str | None, reason: str | None) -> str | None:
    """Why writes are refused on this server (None: they are accepted)."""
    if not api_key:
        return f"writes are off: start the server with {API_KEY_ENV} set to enable POST and DELETE /products"
    if reason:
        return f"writes are off: {reason}"
    if not callable(getattr(engine.gallery, "upsert", None)):
        return ("writes are off: this gallery was embedded at start-up and lives in memory only; serve --index DIR "
                "or --milvus URI to keep changes")
    if len(engine.product_shape) > 1 and not getattr(engine.gallery, "multi_vector", False):
        return (f"writes are off: {type(engine.model).__name__} embeds a product as {engine.product_shape[0]} vectors "
                f"and {type(engine.gallery).__name__} holds one per product")
    return None


class WriteGuard:
    """ASGI middleware: a write without the right key gets 401 (403 when writes are off) before its
    body is read."""

    def __init__(self, app: Any, api_key: str | None, off: str | None) -> None:
        self.app, self.off = app, off
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    @staticmethod
    def is_write(method: str, path: str) -> bool:
        return (method == "POST" and path.rstrip("/") == "/products") or (
            method in ("DELETE", "PUT", "PATCH") and path.startswith("/products"))

    def allowed(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"")
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            given = token.strip()
        # Digests of equal length, compared in constant time: neither the key nor its length leaks.
        return bool(given) and hmac.compare_digest(hashlib.sha256(given).digest(), self._digest or b"")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.is_write(scope["method"], scope["path"]):
            if self.off:
                await JSONResponse({"error": self.off}, status_code=403)(scope, receive, send)
                return
            if not self.allowed(dict(scope["headers"])):
                reason = f"missing or wrong API key: send Authorization: Bearer <{API_KEY_ENV}> or X-API-Key"
                await JSONResponse({"error": reason}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Writer:
    """Puts and removes products: photos, then the store's durable write, one change at a time;
    compacts a change-logged index in the background once ``compact_after`` changes are pending."""

    def __init__(self, engine: SearchEngine, uploads: UploadStore | None, compact_after: int = 10_000) -> None:
        self.engine, self.uploads, self.compact_after = engine, uploads, compact_after
        self._lock = threading.Lock()
        self._compaction: threading.Thread | None = None
        self._retry_at = 0  # pending changes before which a failed compaction is not tried again

    def job(self, dataset: str, pid: str, views: list[Any], category: str, title: str) -> ProductJob:
        return ProductJob(views, {"product_id": pid, "dataset": dataset, "category": category, "gender": "",
                                  "title": title, "split": ""})

    def put(self, dataset: str, pid: str, files: list[bytes], vector: torch.Tensor, category: str,
            title: str) -> bool:
        """Returns whether the product is new."""
        if self.uploads is None:
            raise BadInput(403, "writes are off: no folder for uploaded photos (give --uploads DIR)")
        store, products = self.engine.gallery, self.engine.store
        meta = {"category": category} if category else {}  # what every store keeps; the title is the page's
        with self._lock:
            created = not products.has(dataset, pid)
            previous = self.uploads.save(dataset, pid, [(b, extension(b)) for b in files], category, title)
            try:
                store.upsert(dataset, [pid], vector.float().cpu()[None], [meta])
            except BaseException:
                self.uploads.restore(dataset, pid, previous)
                raise
            finally:
                products.changed()
            self.uploads.prune(dataset, pid, keep=previous)
        self._maybe_compact()
        return created

    def remove(self, dataset: str, pid: str) -> None:
        with self._lock:
            try:
                if not self.engine.gallery.delete(dataset, [pid]):
                    raise UnknownProduct(f"no product {pid!r} in {dataset}")
                if self.uploads is not None:
                    self.uploads.remove(dataset, pid)
            finally:
                self.engine.store.changed()
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        store = self.engine.gallery
        pending = getattr(store, "pending", 0)
        if not (self.compact_after > 0 and pending >= self.compact_after and callable(getattr(store, "compact", None))):
            return
        if self._compaction is not None and self._compaction.is_alive():
            return
        if pending < self._retry_at:  # after a failure, not again before as many changes more
            return

        def compact() -> None:
            t0 = time.perf_counter()
            try:
                store.compact()
                print(f"cir serve: compacted the index ({pending} changes) in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - the log still holds every change; said, and serving goes on
                self._retry_at = pending + self.compact_after
                print(f"cir serve: compaction failed ({type(exc).__name__}: {exc}); the change log keeps every "
                      f"change; the next try after {self.compact_after} more", file=sys.stderr, flush=True)

        self._compaction = threading.Thread(target=compact, name="compaction", daemon=True)
        self._compaction.start()

    def close(self) -> None:
        if self._compaction is not None:
            self._compaction.join(timeout=300)
        close = getattr(self.engine.gallery, "close", None)
        if callable(close):
            close()


def write_dataset(engine: SearchEngine, name: str | None) -> str:
    """The dataset a product is written to: one the service holds, or a new one with a plain name."""
    held = engine.datasets
    if not name:
        if len(held) == 1:
            return held[0]
        raise BadInput(400, f"dataset is missing; this service holds {held} (or name a new one)")
    if name not in held and not NEW_DATASET.fullmatch(name):
        raise BadInput(400, f"dataset {name!r}: a new dataset's name has 1-64 letters, digits, '_' or '-'; this "
                            f"service holds {held}")
    return name


def add_write_routes(app: FastAPI, engine: SearchEngine, batcher: MicroBatcher, limits: Limits, writer: Writer,
                     image_url: Callable[[str, int, str], str]) -> None:
    @app.post("/products", summary="Add a product, or replace one of the same id (needs the API key)",
              status_code=201, responses={200: {"description": "replaced"}, 401: {"description": "no or wrong key"}})
    async def put_product(response: Response,
                          product_id: Annotated[str, Form(description="the product's id (slashes allowed)")],
                          images: Annotated[list[UploadFile], File(description="1-5 photos of the product")],
                          dataset: Annotated[str | None, Form(description="its gallery")] = None,
                          category: Annotated[str, Form()] = "", title: Annotated[str, Form()] = "",
                          ) -> dict[str, Any]:
        ds, pid = write_dataset(engine, dataset), product_id_of(product_id)
        category = limits.text(category, "category") if category.strip() else ""
        title = limits.text(title, "title") if title.strip() else ""
        uploads = [f for f in images if f.filename or f.size]
        if not uploads:
            raise BadInput(400, "no photos: give 1-5 images of the product")
        limits.view_count(len(uploads))
        data = [await f.read(limits.max_image_bytes + 1) for f in uploads]
        names = [f.filename or f"image {i}" for i, f in enumerate(uploads)]
        views = await asyncio.to_thread(lambda: [limits.image(n, b) for n, b in zip(names, data, strict=True)])
        try:
            vector = await batcher(writer.job(ds, pid, views, category, title), limits.timeout_s)
        except QueueFull as error:
            raise BadInput(503, f"the service is busy ({error}); retry shortly") from None
        except TimeoutError:
            raise BadInput(503, f"not embedded within {limits.timeout_s:.0f} s; the service is overloaded") from None
        created = await asyncio.to_thread(writer.put, ds, pid, data, vector, category, title)
        response.status_code = 201 if created else 200
        return {"dataset": ds, "id": pid, "created": created, "views": len(data), "gallery_size":
                engine.gallery_size(ds), "images": [image_url(ds, n, pid) for n in range(len(data))]}

    @app.delete("/products/{dataset}/{product_id:path}", summary="Remove a product (needs the API key)")
    async def delete_product(dataset: str, product_id: str) -> dict[str, Any]:
        await asyncio.to_thread(writer.remove, dataset, product_id)
        return {"dataset": dataset, "id": product_id, "deleted": True}
