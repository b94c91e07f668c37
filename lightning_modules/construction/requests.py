"""The user turns of the three stages: what each request shows the model, in the paper's order.

Stage 1 sends the views themselves, each after its ``[Image k]`` label; stages 2 and 3 send each
product as one stitched composite. Images larger than ``max_side`` are scaled down and re-encoded,
others go as their original bytes.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..generation.chat import ImagePart, Part, encode_image
from .stitch import stitch

MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def load_view(path: Path) -> Image.Image:
    """RGB, upright: a camera's EXIF orientation applied, as every stage must see the same pixels."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def view_part(path: Path, max_side: int) -> ImagePart:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        rotated = img.getexif().get(0x0112, 1) != 1  # the orientation tag
        if max(img.size) <= max_side and not rotated:
            return ImagePart(data, MIME[path.suffix.lower()])
    img = load_view(path)
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    return encode_image(img)


class Composites:
    """Each product's stitched views, encoded once and kept for a while: stage 3 shows a product as
    a candidate in many requests."""

    def __init__(self, height: int, keep: int = 1024) -> None:
        self.height, self.keep = height, keep
        self._cache: OrderedDict[str, tuple[ImagePart, list[list[int]]]] = OrderedDict()

    def __call__(self, pid: str, views: list[Path]) -> tuple[ImagePart, list[list[int]]]:
        if pid in self._cache:
            self._cache.move_to_end(pid)
            return self._cache[pid]
        composite, boxes = stitch([load_view(p) for p in views], self.height)
        self._cache[pid] = (encode_image(composite), boxes)
        if len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return self._cache[pid]


def caption_turn(views: list[Path], max_side: int) -> list[Part]:
    parts: list[Part] = []
    for k, path in enumerate(views, 1):
        parts += [f"[Image {k}]", view_part(path, max_side)]
    parts.append(f"These {len(views)} images show one product. Answer with the JSON object only.")
    return parts


def _captions_text(captions: dict[str, Any]) -> str:
    lines = [f"image_caption_{k}: {c}" for k, c in enumerate(captions["image_captions"], 1)]
    lines += [f"long_caption: {captions['long_caption']}", f"short_caption: {captions['short_caption']}"]
    return "\n".join(lines)


def verify_turn(products: list[tuple[str, list[Path], dict[str, Any]]], composites: Composites) -> list[Part]:
    parts: list[Part] = [f"{len(products)} products follow. Answer with one JSON array element per product."]
    for k, (pid, views, captions) in enumerate(products, 1):
        composite, boxes = composites(pid, views)
        box_text = ", ".join(f"image_{i}: {b}" for i, b in enumerate(boxes, 1))
        parts += [f"Product {k} (product_id: {pid})\nPanorama of {len(views)} images:", composite,
                  f"Bounding boxes (0-1000): {box_text}\n{_captions_text(captions)}"]
    return parts


def _product_text(captions: dict[str, Any]) -> str:
    lines = [f"Image {k}: {c}" for k, c in enumerate(captions["image_captions"], 1)]
    return "Per-image descriptions:\n" + "\n".join(lines) + f"\nLong caption: {captions['long_caption']}"


Shown = tuple[str, list[Path], dict[str, Any]]  # (product id, its view files, its stage-1 captions)


def triplet_turn(source: Shown, candidates: list[Shown], composites: Composites) -> list[Part]:
    pid, views, captions = source
    parts: list[Part] = ["SOURCE product, its views side by side:", composites(pid, views)[0], _product_text(captions),
                         f"{len(candidates)} CANDIDATE products follow."]
    for k, (cid, cviews, ccaptions) in enumerate(candidates, 1):
        parts += [f"[Product {k}], its views side by side:", composites(cid, cviews)[0], _product_text(ccaptions)]
    parts.append("Answer with the JSON object only; target_id is the candidate's number.")
    return parts
