"""Photos as cameras store them: a phone's sideways pixels with an EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image

ROTATED_CW = 6  # stored pixels must be turned 90° clockwise to be seen upright


def phone_jpeg(width: int, height: int, tag: int = ROTATED_CW, seed: int = 0) -> tuple[bytes, Image.Image]:
    """A ``width × height`` (upright) picture stored as a camera stores it for ``tag``, and the
    upright pixels: the stored JPEG's own decode, turned by hand."""
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    stored = picture.transpose(Image.Transpose.ROTATE_90) if tag == ROTATED_CW else picture
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = tag
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return buf.getvalue(), decoded.transpose(Image.Transpose.ROTATE_270) if tag == ROTATED_CW else decoded
