from __future__ import annotations

import io

import pytest
from PIL import Image

from cir.serve.limits import BadInput, Limits, upload_digest


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 20, 20)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((w, h), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def _gif(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "GIF")  # PIL reads GIFs, the service does not take them
    return buf.getvalue()


def test_a_valid_image_is_returned_as_rgb() -> None:
    img = Limits().image("front.png", _png(30, 40))
    assert img.mode == "RGB" and img.size == (30, 40)


@pytest.mark.parametrize(("data", "limits", "status", "words"), [
    (b"plain text, not pixels", Limits(), 415, "'x' is not an image"),
    (_jpeg(64, 64)[:300], Limits(), 415, "'x' could not be decoded"),
    (b"", Limits(), 400, "'x' is empty"),
    (_jpeg(64, 64), Limits(max_image_bytes=100), 413, "at most 100 are accepted"),
    (_png(20, 20), Limits(max_pixels=399), 413, "20x20 pixels; at most 399"),
    # Only the header is whole: refused by its size (413), never decoded (which would fail: 415).
    (_png(3000, 3000)[:200], Limits(max_pixels=10**6), 413, "3000x3000 pixels"),
    (_png(400, 10), Limits(), 400, "at most 20 times the other"),
    (_gif(8, 8), Limits(), 415, "'x' is not an image (JPEG, PNG or WebP expected)"),
])
def test_bad_images_are_refused_with_the_file_named(data: bytes, limits: Limits, status: int, words: str) -> None:
    with pytest.raises(BadInput) as caught:
        limits.image("x", data)
    assert caught.value.status == status and words in caught.value.reason and "\n" not in caught.value.reason


def test_text_k_and_view_count_limits() -> None:
    limits = Limits(max_text_chars=10, max_k=5)
    assert limits.text("  red  ") == "red"
    for text in ("", "   ", None):
        with pytest.raises(BadInput, match="text is empty"):
            limits.text(text)
    with pytest.raises(BadInput, match="11 characters; at most 10"):
        limits.text("x" * 11)
    for k in (0, 6):
        with pytest.raises(BadInput, match="ask for 1 to 5"):
            limits.k(k)
    limits.view_count(5)
    with pytest.raises(BadInput, match="6 images given"):
        limits.view_count(6)


def test_upload_digest_depends_on_the_bytes_and_their_order() -> None:
    a, b = _png(4, 4), _png(5, 5)
    assert upload_digest([a, b]) == upload_digest([a, b]) != upload_digest([b, a])
    assert upload_digest([a + b]) != upload_digest([a, b])  # lengths are part of the key
