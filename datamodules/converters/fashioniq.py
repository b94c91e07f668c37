"""FashionIQ (Wu et al., CVPR 2021) → shards.

Reads the dataset's own layout::

    ROOT/captions/cap.{category}.{split}.json     [{"target", "candidate", "captions": [c1, c2]}, ...]
    ROOT/image_splits/split.{category}.{split}.json   [image name, ...]
    ROOT/images/{name}.{jpg,png}

Each category becomes its own dataset (``fashioniq_dress``, ``fashioniq_shirt``,
``fashioniq_toptee``) so it is evaluated on its own gallery, as CLIP4Cir does. The gallery of a
split is that category's split image list; the test split has no targets and becomes query-only
samples. A missing or unreadable image skips what needs it, and is counted in ``summary.json``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batching import fashioniq_text
from ..interfaces import ProgressSink
from ..schema import Triplet, check_key
from ..shards import ShardSetWriter, write_manifest
from .common import find_image, load_image_bytes, read_json, write_summary

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def dataset_name(category: str) -> str:
    return f"fashioniq_{category}"


def _load(images: Path, name: str, category: str, max_side: int | None) -> tuple[dict[str, Any], list[bytes]] | None:
    path = find_image(images, name)
    data = load_image_bytes(path, max_side) if path is not None else None
    if data is None:
        return None
    meta = {"product_id": check_key(name, "FashionIQ image name"), "dataset": dataset_name(category),
            "category": category, "view_names": ["image"], "short_caption": "", "long_caption": "",
            "view_captions": [], "attributes": {}, "raw_id": name}
    return meta, [data]


class _ProductCache:
    """Reads each image once per split, however many triplets and the gallery use it."""

    def __init__(self, images: Path, category: str, max_side: int | None) -> None:
        self.images, self.category, self.max_side = images, category, max_side
        self.items: dict[str, tuple[dict[str, Any], list[bytes]] | None] = {}

    def __call__(self, name: str) -> tuple[dict[str, Any], list[bytes]] | None:
        if name not in self.items:
            self.items[name] = _load(self.images, name, self.category, self.max_side)
        return self.items[name]


def convert_fashioniq(root: str | Path, out: str | Path, categories: Sequence[str] = CATEGORIES,
                      splits: Sequence[str] = SPLITS, maxcount: int = 1000,
                      max_side: int | None = None, order_seed: int = 0,
                      progress: ProgressSink | None = None) -> dict[str, Any]:
    """Write shards + ``manifest.json`` + ``summary.json``; returns the summary. Each split's triplets
    are written in a random order seeded by ``order_seed`` over all categories, so neighbouring
    records are not one category's consecutive annotations. ``progress`` counts images and captions."""
    root, out = Path(root), Path(out)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown FashionIQ categories {unknown}; choose from {list(CATEGORIES)}")
    images = root / "images"
    summary: dict[str, dict[str, dict[str, int]]] = {c: {} for c in categories}
    manifest_splits: dict[str, dict[str, Any]] = {}
    for split in splits:
        writer = ShardSetWriter(out, split, maxcount=maxcount)
        queued: list[tuple[Triplet, Any, Any]] = []
        for category in categories:
            counts = {"triplets_written": 0, "triplets_skipped": 0, "gallery_written": 0, "gallery_missing": 0}
            dataset = dataset_name(category)
            product = _ProductCache(images, category, max_side)
            names = read_json(root / "image_splits" / f"split.{category}.{split}.json")
            entries = read_json(root / "captions" / f"cap.{category}.{split}.json")
            if progress is not None:
                progress.expect(len(names) + len(entries))
            for name in names:
                if progress is not None:
                    progress.update(1)
                item = product(name)
                if item is None:
                    counts["gallery_missing"] += 1
                    continue
                writer.write_product(*item)
                counts["gallery_written"] += 1
            for n, entry in enumerate(entries):
                if progress is not None:
                    progress.update(1)
                if "candidate" not in entry or "captions" not in entry:
                    raise ValueError(f"{root}/captions/cap.{category}.{split}.json entry {n}: needs 'candidate' "
                                     f"and 'captions', has {sorted(entry)}")
                target_name = entry.get("target")
                source = product(entry["candidate"])
                target = product(target_name) if target_name is not None else None
                if source is None or (target_name is not None and target is None):
                    counts["triplets_skipped"] += 1
                    continue
                captions = [str(c) for c in entry["captions"]]
                triplet = Triplet(entry["candidate"], target_name, dataset,
                                  modification_short=fashioniq_text(captions, None) or "(no caption)",
                                  relative_captions=captions)
                queued.append((triplet, source, target))
                counts["triplets_written"] += 1
            summary[category][split] = counts
        random.Random(f"{order_seed}|{split}").shuffle(queued)
        for triplet, source, target in queued:
            writer.write_triplet(triplet, source, target)
        manifest_splits[split] = writer.close()
    write_manifest(out, manifest_splits, [dataset_name(c) for c in categories],
                   {"converter": "fashioniq", "root": str(root), "categories": list(categories)})
    write_summary(out, summary)
    return summary
