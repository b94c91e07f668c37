"""Chat requests and answers, independent of where the model runs.

A request is a system text and one user turn of interleaved text and images (encoded bytes, so an
HTTP backend sends them as they are and an in-process one decodes them once). ``tag`` is the
caller's bookkeeping (stage, product ids): backends never show it to a model.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass(frozen=True)
class ImagePart:
    data: bytes
    mime: str = "image/jpeg"

    def pil(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")


def encode_image(image: Image.Image, quality: int = 92, lossless: bool = False) -> ImagePart:
    """JPEG for what goes over the wire; PNG where the model must see the exact pixels."""
    buf = io.BytesIO()
    if lossless:
        image.convert("RGB").save(buf, format="PNG", compress_level=1)
        return ImagePart(buf.getvalue(), "image/png")
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return ImagePart(buf.getvalue(), "image/jpeg")


Part = str | ImagePart


@dataclass
class ChatRequest:
    user: list[Part]
    system: str | None = None
    max_tokens: int = 1024
    temperature: float = 0.0
    tag: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.user if isinstance(p, ImagePart)]


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # no answer: text is then empty
    requests: int = 1  # HTTP attempts it took (retries on 429/5xx/timeouts included)
    # The HTTP status behind ``error``: None for a transport failure (worth another run), a 4xx
    # for a request the server will never accept as it is.
    status: int | None = None
    # Set when the last attempt found nothing listening ("connection refused"): the endpoint, not
    # the request, is what failed.
    unreachable: str | None = None


OnResult = Callable[[int, Completion], None]


class EndpointUnavailable(RuntimeError):
    """The endpoint cannot serve a single request; ``kind`` says what answered: ``connect`` (nothing
    listens, or the host is unknown), ``timeout``, ``status`` (an HTTP error, in ``status``) or
    ``model`` (the server does not know the model). The caller adds which of its options to fix."""

    def __init__(self, url: str, what: str, kind: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {what}")
        self.url, self.what, self.kind, self.status = url, what, kind, status


class ChatBackend(Protocol):
    """Answers requests; calls ``on_result(index, completion)`` as each one finishes, in any order,
    from the calling thread, so the caller can persist answers the moment they exist."""

    name: str

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None: ...

    def close(self) -> None: ...
