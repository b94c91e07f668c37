"""Views side by side in one composite picture, with each view's box on a 0-1000 scale.

The verifier (stage 2) gets the boxes so it can say where in the panorama a feature is; stage 3
shows each product as one composite. Views are scaled to one height, keeping their aspect ratios.
"""

from __future__ import annotations

from PIL import Image


def stitch(views: list[Image.Image], height: int = 512) -> tuple[Image.Image, list[list[int]]]:
    """(composite, boxes): ``boxes[i] = [x_min, y_min, x_max, y_max]`` of view ``i`` in 0-1000
    coordinates of the composite's width and height. ``height`` is a ceiling: small views are not
    blown up beyond the tallest one."""
    if not views:
        raise ValueError("stitch needs at least one view")
    height = min(height, max(v.height for v in views))
    scaled = [v.convert("RGB") if v.height == height else
              v.convert("RGB").resize((max(1, round(v.width * height / v.height)), height), Image.BICUBIC)
              for v in views]
    width = sum(v.width for v in scaled)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    boxes, x = [], 0
    for v in scaled:
        canvas.paste(v, (x, 0))
        boxes.append([round(x * 1000 / width), 0, round((x + v.width) * 1000 / width), 1000])
        x += v.width
    return canvas, boxes
