from __future__ import annotations

from PIL import Image

from lightning_modules.construction.stitch import stitch


def test_views_side_by_side_at_one_height_with_0_1000_boxes() -> None:
    red = Image.new("RGB", (100, 50), (255, 0, 0))  # wide: scaled to 200 x 100
    green = Image.new("RGB", (50, 100), (0, 255, 0))  # tall: already 100 high
    blue = Image.new("RGB", (150, 300), (0, 0, 255))  # scaled to 50 x 100
    pano, boxes = stitch([red, green, blue], height=100)
    assert pano.size == (300, 100)
    assert boxes == [[0, 0, 667, 1000], [667, 0, 833, 1000], [833, 0, 1000, 1000]]
    for (x0, _, x1, _), colour in zip(boxes, [(255, 0, 0), (0, 255, 0), (0, 0, 255)], strict=True):
        middle = round((x0 + x1) / 2 * 300 / 1000)
        assert pano.getpixel((middle, 50)) == colour  # the order of the views is kept


def test_a_single_view_fills_the_frame_and_small_views_are_not_blown_up() -> None:
    pano, boxes = stitch([Image.new("RGB", (64, 64), (9, 9, 9))], height=32)
    assert pano.size == (32, 32) and boxes == [[0, 0, 1000, 1000]]
    pano, boxes = stitch([Image.new("RGB", (40, 80)), Image.new("RGB", (30, 60))], height=512)
    assert pano.size == (80, 80) and boxes == [[0, 0, 500, 1000], [500, 0, 1000, 1000]]  # 30x60 → 40x80
