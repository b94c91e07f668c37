"""Image files given by a user (``cir query``, ``cir search query``, ``cir serve`` uploads) read the
way a viewer shows them.

Phones store a portrait photo as landscape pixels plus an EXIF Orientation tag; a picture viewer,
a browser and ``cir build`` (``construction.requests.load_view``) turn it, but a bare
``Image.open`` does not, and the model would embed the product lying on its side. The transposition
is a permutation of decoded pixels: the result equals the upright image exactly.

It sits in ``datamodules`` so that the catalogue reader and every layer above may import it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from PIL import ExifTags, Image, ImageOps

QUARTER_TURNS = frozenset({5, 6, 7, 8})  # orientations whose upright image swaps width and height


def orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 to 8; 1 (as stored) when absent or unreadable.

    For a PNG, PIL decodes the whole file to find its EXIF chunk: call this on a loaded image, after
    any size limit was checked."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError, struct.error):
        return 1  # a damaged EXIF block says nothing reliable; the pixels are still a picture
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned and/or mirrored as its orientation tag says (``img`` itself when it is upright).
    The tag is removed from the result, so applying this twice turns it only once."""
    if orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def open_upright(source: str | Path | BinaryIO) -> Image.Image:
    """An image file (a path or an open binary file) as upright RGB, decoded now and the file closed."""
    with Image.open(source) as img:
        img.load()
        # convert() copies even when the mode is already RGB, so nothing returned refers to the closed file.
        return upright(img).convert("RGB")
