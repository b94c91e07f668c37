"""What the service accepts, and the one-line reasons it gives when a request asks for more.

Every check raises ``BadInput`` with an HTTP status and a sentence that names the field or file and
what is allowed; the app turns it into ``{"error": ...}``. Images are measured before their pixels
are decoded, so a decompression bomb past the pixel limit costs a header read, not gigabytes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from datamodules.schema import MAX_VIEWS
from lightning_modules.backbones.images import upright

FORMATS = ("JPEG", "PNG", "WEBP")  # what product photos come as; PIL's other readers stay closed


class BadInput(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    max_views: int = MAX_VIEWS
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 36_000_000  # a 6000 × 6000 photo
    # Resizers keep the short side: a 100000 × 1 strip would become a 20 GB tensor (CLIP), or be refused
    # by Qwen's resizer past 200:1 in the model thread. No product photo is that thin.
    max_aspect: float = 20.0
    max_text_chars: int = 500
    max_k: int = 100
    timeout_s: float = 60.0

    @property
    def max_request_bytes(self) -> int:
        return self.max_views * self.max_image_bytes + 2**20  # the views plus the form's text fields

    def text(self, text: str | None, field: str = "text") -> str:
        text = (text or "").strip()
        if not text:
            raise BadInput(400, f"{field} is empty: give the modification, e.g. 'make it red with long sleeves'")
        if len(text) > self.max_text_chars:
            raise BadInput(400, f"{field} has {len(text)} characters; at most {self.max_text_chars} are accepted")
        return text

    def k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise BadInput(400, f"k={k}: ask for 1 to {self.max_k} results")
        return k

    def image(self, name: str, data: bytes) -> Image.Image:
        """An uploaded view as upright RGB (its EXIF orientation applied, as a phone's viewer shows
        it), or a ``BadInput`` naming the file."""
        if len(data) > self.max_image_bytes:
            raise BadInput(413, f"image {name!r} has {len(data)} bytes; at most {self.max_image_bytes} are accepted")
        if not data:
            raise BadInput(400, f"image {name!r} is empty")
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            # The stored size, from the header: a quarter turn swaps width and height, which changes
            # neither the pixel count nor the long/short ratio, so these checks hold for the upright
            # image too, and they run before anything is decoded (the orientation of a PNG is not
            # known until it is).
            w, h = img.size
            if w * h > self.max_pixels:
                raise BadInput(413, f"image {name!r} is {w}x{h} pixels; at most {self.max_pixels} pixels are accepted")
            if max(w, h) > self.max_aspect * max(1, min(w, h)):
                raise BadInput(400, f"image {name!r} is {w}x{h} pixels; one side may be at most {self.max_aspect:g} "
                                    "times the other")
            img.load()
            return upright(img).convert("RGB")
        except BadInput:
            raise
        except Image.DecompressionBombError:
            raise BadInput(413, f"image {name!r} is too large to decode safely") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            kind = "is not an image" if isinstance(error, UnidentifiedImageError) else "could not be decoded"
            raise BadInput(415, f"file {name!r} {kind} (JPEG, PNG or WebP expected)") from None

    def view_count(self, n: int) -> None:
        if n > self.max_views:
            raise BadInput(400, f"{n} images given; a source product has 1 to {self.max_views} views")


def upload_digest(files: list[bytes]) -> str:
    """The cache key of an uploaded source: its views' bytes, in order."""
    h = hashlib.sha256()
    for data in files:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
