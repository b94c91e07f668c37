"""The source of a query or of a session's first turn: a gallery product, or 1-5 uploaded views."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from fastapi import UploadFile
from PIL import Image

from .engine import SearchEngine
from .limits import BadInput, Limits, upload_digest


async def read_source(engine: SearchEngine, limits: Limits, dataset: str, product_id: str | None,
                      images: list[UploadFile] | None, caption: str = "", field: str = "source_id",
                      ) -> tuple[list[Image.Image], Hashable, str]:
    """The views, the turn-1 cache key and the caption of a gallery product (``product_id``, named
    ``field`` in the errors) or of uploaded views, each checked as ``Limits`` says."""
    uploads = [f for f in images or [] if f.filename or f.size]
    if product_id and uploads:
        raise BadInput(400, f"give either {field} or images, not both")
    if product_id:
        views, own = await asyncio.to_thread(engine.store.source, dataset, product_id)
        return views, engine.store.source_key(dataset, product_id), own
    if not uploads:
        raise BadInput(400, f"no source: give {field} (a gallery product) or 1-5 images")
    limits.view_count(len(uploads))
    data = [await f.read(limits.max_image_bytes + 1) for f in uploads]
    names = [f.filename or f"image {i}" for i, f in enumerate(uploads)]
    views = await asyncio.to_thread(lambda: [limits.image(n, b) for n, b in zip(names, data, strict=True)])
    return views, ("upload", upload_digest(data)), limits.text(caption, "source_caption") if caption else ""
