"""Lazily decoded shard views: reduced JPEG decoding at the right scale, and everything that reads a
view as a PIL image still seeing the full picture."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from datamodules.batching import TargetPad
from datamodules.fast_decode import CorruptSample, LazyJpeg, decode_at_least, open_view
from datamodules.shards import decode_sample

WIDTH, HEIGHT = 1000, 1333


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth background, a few hard-edged shapes and pixel noise: what a JPEG decoder meets in a
    product photo, made in a few milliseconds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([200 + 30 * np.sin(x / 97), 180 + 40 * np.cos(y / 131), 160 + 20 * np.sin((x + y) / 53)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(width / 12, width / 4)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return jpeg(photo(WIDTH, HEIGHT))


@pytest.fixture(scope="module")
def big_pixels(big_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(big_jpeg)).convert("RGB"))


def expected_scale(width: int, height: int) -> int:
    """Brute force: the largest reduction whose extent still covers the request (none: full size)."""
    return max([s for s in (1, 2, 4, 8) if WIDTH / s >= width and HEIGHT / s >= height], default=1)


@pytest.mark.parametrize("request_size", [(224, 298), (120, 170), (500, 600), (501, 10), (2000, 2000)])
def test_reduced_decode_is_the_smallest_scale_that_still_covers_the_request(
        big_jpeg: bytes, big_pixels: np.ndarray, request_size: tuple[int, int]) -> None:
    view = open_view(big_jpeg)
    assert isinstance(view, LazyJpeg) and view.size == (WIDTH, HEIGHT)
    decoded = decode_at_least(view, *request_size)
    s = expected_scale(*request_size)
    assert decoded.image.size == (math.ceil(WIDTH / s), math.ceil(HEIGHT / s))
    assert decoded.box == pytest.approx((0, 0, WIDTH / s, HEIGHT / s))
    assert decoded.image.mode == "RGB"
    # The same picture: close to the full decode averaged over s×s blocks (whole blocks only).
    full = big_pixels.astype(np.float32)
    h, w = HEIGHT // s, WIDTH // s
    blocks = full[: h * s, : w * s].reshape(h, s, w, s, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(decoded.image, dtype=np.float32)[:h, :w] - blocks).mean() < 4.0
    # The view itself is untouched: still full size, and its pixels are the full decode's.
    assert view.size == (WIDTH, HEIGHT)
    assert np.array_equal(np.asarray(view), big_pixels)


def test_a_lazy_view_is_decoded_only_when_its_pixels_are_read(big_jpeg: bytes) -> None:
    truncated = big_jpeg[: len(big_jpeg) // 2]  # a valid header, half the scan data
    sample = {"__key__": "k", "json": b'{"product_id": "p"}', "view0.jpg": truncated}
    view = decode_sample(sample)["view0.jpg"]
    assert isinstance(view, LazyJpeg) and view.size == (WIDTH, HEIGHT)
    # PIL's "image file is truncated" OSError, raised as CorruptSample: the pipelines skip only those.
    with pytest.raises(CorruptSample, match="truncated"):
        np.asarray(view)
    with pytest.raises(CorruptSample, match="truncated"):
        decode_at_least(view, 100, 100)
    with pytest.raises(CorruptSample, match="truncated"):
        decode_sample(sample, lazy=False)  # eager decoding fails in the decoder, as before


def test_members_other_than_colour_jpegs_are_decoded_at_once_as_rgb() -> None:
    img = photo(40, 30)
    rgba, grey = io.BytesIO(), jpeg(img.convert("L"))
    img.convert("RGBA").save(rgba, format="PNG")
    out = decode_sample({"json": b"{}", "view0.png": rgba.getvalue(), "view1.jpg": grey})
    for name in ("view0.png", "view1.jpg"):
        assert not isinstance(out[name], LazyJpeg) and out[name].mode == "RGB" and out[name].size == (40, 30)
    assert np.array_equal(np.asarray(out["view0.png"]), np.asarray(img))
    # An already decoded image is used whole: nothing to reduce.
    decoded = decode_at_least(out["view0.png"], 10, 10)
    assert decoded.image is out["view0.png"] and decoded.box == (0, 0, 40, 30)


def test_a_lazy_view_pickles_as_its_bytes(big_jpeg: bytes) -> None:
    view = open_view(big_jpeg)
    payload = pickle.dumps(view)
    assert len(payload) < len(big_jpeg) + 1000  # not the 4 MB of decoded pixels
    back = pickle.loads(payload)
    assert isinstance(back, LazyJpeg) and np.array_equal(np.asarray(back), np.asarray(view))


def test_target_pad_sees_a_lazy_view_as_the_full_image() -> None:
    data = jpeg(photo(90, 150))
    pad = TargetPad(1.25, lambda img: np.asarray(img))
    assert np.array_equal(pad(open_view(data)), pad(Image.open(io.BytesIO(data)).convert("RGB")))
