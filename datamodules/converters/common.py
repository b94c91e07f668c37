"""Helpers shared by the dataset converters: image loading that tolerates a partial copy, summaries."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..jsonl import numbered_json_lines
from ..shards import encode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ORIGINAL_FORMATS = ("JPEG", "PNG", "WEBP")


def load_image_bytes(path: Path, max_side: int | None = None, keep_original: bool = True) -> bytes | None:
    """The image at ``path`` as bytes for a shard, or None when it is missing or unreadable.

    Real copies of FashionIQ and FashionMV miss thousands of images and hold some broken files:
    a converter counts those and goes on rather than failing hours into a run. Every file is
    decoded in full before it is accepted. A JPEG, PNG or WebP that needs no resize is stored as its
    own bytes (``keep_original``) (decoding them gives exactly the pixels an evaluator reading
    the file sees); anything else is re-encoded as JPEG.
    """
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if keep_original and img.format in ORIGINAL_FORMATS and not (max_side and max(img.size) > max_side):
                return data
            img = img.convert("RGB")
            if max_side and max(img.size) > max_side:
                img.thumbnail((max_side, max_side))
            return encode_image(img)
    except FileNotFoundError:
        return None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        log.warning("unreadable image %s: %s", path, exc)
        return None


def find_image(folder: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return path


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: check --root (expected the dataset's own layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: check --root (expected the dataset's own layout)")
    return [row for _, row in numbered_json_lines(path, path.read_text().splitlines())]
