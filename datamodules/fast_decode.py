"""Shard views that are decoded only once a transform knows the size it needs.

A JPEG can be decoded in the DCT domain at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled IDCT,
PIL's ``Image.draft``) for a fraction of a full decode. A model resizes every view to a few hundred
pixels anyway, so the transform asks for the smallest reduced decode that is still at least the
size it will resize to, and resizes that instead of the full-size image.

``LazyJpeg`` is such a view: a PIL image (so everything that reads views keeps working and gets
the full-size picture on first pixel access) that also offers ``decode_at_least``, which decodes a
fresh reduced copy and never changes the view itself. The pixels of a view are always those of its
bytes, whatever was read from it before.

Bytes that do not decode raise ``CorruptSample`` wherever the decode happens: when the view is
opened, or later, inside a model's transform, when a lazy view's pixels are first read. The data
pipelines skip and count those (``shards.SkipCounter``) and stop on any other error.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

JPEG_MAGIC = b"\xff\xd8\xff"
Box = tuple[float, float, float, float]


class CorruptSample(ValueError):
    """A shard sample that is damaged data, not a bug: an image that does not decode, JSON or text
    that does not parse, a missing member or metadata key, a damaged tar stream.

    The data pipelines skip and count these (``shards.SkipCounter``, up to a budget); every other
    exception stops the run. Defined here, the lowest layer, so the lazy decode can raise it;
    ``datamodules.shards`` re-exports it.
    """


def sample_where(sample: object) -> str:
    """``url:key`` of a WebDataset sample (``?`` for what it lacks): how errors name a sample."""
    if not isinstance(sample, dict):
        return "?:?"
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


# What PIL raises for bytes that are not a decodable image: UnidentifiedImageError and "image file
# is truncated" are OSErrors, an unparsable header a SyntaxError, damaged tables struct.error,
# ValueError or EOFError; a huge declared size DecompressionBombError.
IMAGE_DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                                                    Image.DecompressionBombError)


def _undecodable(exn: Exception, nbytes: int) -> CorruptSample:
    return CorruptSample(f"image of {nbytes} bytes does not decode: {type(exn).__name__}: {exn}")


@dataclass(frozen=True)
class Decoded:
    """A decoded view and ``box``: the region of ``image``, in its pixels (fractions allowed), that
    holds the whole view. A reduced decode of a side that is not a multiple of the scale ends in a
    partly covered pixel, so the box is what a resize must map onto the output to keep alignment."""

    image: Image.Image
    box: Box


@runtime_checkable
class ScalableView(Protocol):
    """A view not decoded yet that can be decoded at a reduced scale."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) at full size, known from the header alone."""
        ...

    def decode_at_least(self, width: int, height: int) -> Decoded:
        """The view decoded at the smallest available scale whose extent is at least width × height
        (full size when no reduced scale is that large), as RGB."""
        ...


class LazyJpeg(JpegImageFile):
    """A JPEG view kept as its bytes until used.

    As a PIL image it decodes at full size on first pixel access, like any image PIL opened from a
    file. ``decode_at_least`` decodes a separate reduced copy. Pickles as its bytes.
    """

    def __init__(self, data: bytes) -> None:
        try:
            super().__init__(io.BytesIO(data))
        except IMAGE_DECODE_ERRORS as exn:  # the header alone does not parse
            raise _undecodable(exn, len(data)) from exn
        self.jpeg_bytes = data
        limit = Image.MAX_IMAGE_PIXELS
        # Image.open refuses decompression bombs; this class is built without it, so check here.
        if limit is not None and self.width * self.height > 2 * limit:
            bomb = Image.DecompressionBombError(
                f"JPEG of {self.width}x{self.height} pixels exceeds twice PIL's MAX_IMAGE_PIXELS ({limit})")
            raise _undecodable(bomb, len(data)) from bomb

    def __reduce__(self) -> tuple[type[LazyJpeg], tuple[bytes]]:
        return LazyJpeg, (self.jpeg_bytes,)

    def load(self) -> Image.core.PixelAccess | None:
        """PIL's full decode (every pixel access goes through it), with a damaged scan raised as
        ``CorruptSample``: this runs inside a model's transform, long after the sample was opened."""
        try:
            return super().load()
        except IMAGE_DECODE_ERRORS as exn:
            raise _undecodable(exn, len(self.jpeg_bytes)) from exn

    def decode_at_least(self, width: int, height: int) -> Decoded:
        try:
            img = JpegImageFile(io.BytesIO(self.jpeg_bytes))
            drafted = img.draft("RGB", (max(width, 1), max(height, 1)))
            img.load()
        except IMAGE_DECODE_ERRORS as exn:
            raise _undecodable(exn, len(self.jpeg_bytes)) from exn
        box: Box = drafted[1] if drafted is not None else (0.0, 0.0, float(img.width), float(img.height))
        return Decoded(img if img.mode == "RGB" else img.convert("RGB"), box)


def open_view(data: bytes) -> Image.Image:
    """An image member of a shard: a ``LazyJpeg`` for a colour JPEG, any other image decoded now as
    RGB (PNG, WebP, greyscale or CMYK JPEG: nothing to gain from deferring them). Raises
    ``CorruptSample`` for bytes that do not decode (a lazy view: its header only, until used)."""
    if data.startswith(JPEG_MAGIC):
        view = LazyJpeg(data)
        if view.mode == "RGB":
            return view
    return decode_now(data)


def decode_now(data: bytes) -> Image.Image:
    """``data`` fully decoded as RGB; bytes that do not decode raise ``CorruptSample``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # the full decode, so a truncated file fails here and not later
        return img.convert("RGB")
    except IMAGE_DECODE_ERRORS as exn:
        raise _undecodable(exn, len(data)) from exn


def decode_at_least(image: Image.Image | ScalableView, width: int, height: int) -> Decoded:
    """``image`` decoded to at least width × height when it is a ``ScalableView``; an image that is
    already decoded is returned whole."""
    if isinstance(image, ScalableView):
        return image.decode_at_least(width, height)
    return Decoded(image, (0.0, 0.0, float(image.width), float(image.height)))

