"""A retailer's catalogue: ``images/<product_id>/*.{jpg,jpeg,png,webp}`` and an optional
``products.jsonl`` (``product_id`` and any of ``dataset``, ``category``, ``gender``, ``title``,
``split``).

Product ids may be nested paths (``dresses/summer/1234``): every folder under ``images/`` with image
files directly inside is a product. Views are taken in sorted file-name order, at most 5, as the
FashionMV converter takes them. A view that PIL cannot read is dropped; a product left with none
is skipped and counted, never a crash. A catalogue left with no product at all is an error naming
why (no image files, or none readable): a build of nothing would only report zeros.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from datamodules.converters.common import IMAGE_SUFFIXES
from datamodules.jsonl import numbered_json_lines
from datamodules.schema import MAX_VIEWS, check_key

SPLITS = ("train", "val")


@dataclass
class CatalogueProduct:
    product_id: str
    dataset: str
    views: list[Path]
    category: str = ""
    gender: str = ""
    title: str = ""
    split: str = ""

    def meta(self) -> dict[str, Any]:
        return {"product_id": self.product_id, "dataset": self.dataset, "category": self.category,
                "gender": self.gender, "title": self.title, "split": self.split}


@dataclass
class Catalogue:
    products: list[CatalogueProduct]
    counts: Counter = field(default_factory=Counter)

    def by_id(self) -> dict[str, CatalogueProduct]:
        return {p.product_id: p for p in self.products}


def readable(path: Path) -> bool:
    """Decoded whole: ``verify()`` alone passes a truncated JPEG that fails later, mid-stage."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for n, row in numbered_json_lines(path, path.read_text().splitlines(), "; fix or delete the line"):
        if not isinstance(row, dict) or "product_id" not in row:
            raise ValueError(f"{path}:{n}: each line needs a product_id")
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise ValueError(f"{path}:{n}: split {split!r}; use one of {SPLITS} or leave it out")
        if str(row["product_id"]) in rows:
            raise ValueError(f"{path}:{n}: product_id {row['product_id']!r} is listed twice; keep one line")
        rows[str(row["product_id"])] = row
    return rows


def read_catalogue(root: str | Path, default_dataset: str = "catalogue", max_views: int = MAX_VIEWS,
                   check_views: bool = True, dataset_folders: bool = False) -> Catalogue:
    """The products of the catalogue at ``root``. ``check_views``: decode every view now and drop
    the unreadable ones (``cir build``, which must not fail mid-stage); without it views are only
    listed and the reader of each view skips and counts what it cannot decode (``cir index`` and the
    exporter over 10^5+ products, where decoding everything twice would double the work).
    ``dataset_folders``: the first folder under ``images/`` names the dataset (the FashionMV
    release's ``images/<dataset>/<product_id>/``)."""
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"catalogue {root}: no images/ folder; expected images/<product_id>/*.jpg "
                                "(write a demo one with `cir data synthetic --layout catalogue --out DIR`)")
    meta_file = root / "products.jsonl"
    rows = _rows(meta_file) if meta_file.is_file() else {}
    folders: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(images.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            folders[path.parent.relative_to(images).as_posix()].append(path)
    counts: Counter = Counter({"products_in": 0, "no_readable_images": 0, "unreadable_views": 0,
                               "without_category": 0})
    products = []
    for pid in sorted(set(folders) | set(rows)):
        counts["products_in"] += 1
        listed = sorted(folders.get(pid, []), key=lambda p: p.name)[:max_views]
        views = [p for p in listed if readable(p)] if check_views else listed
        counts["unreadable_views"] += len(listed) - len(views)
        if not views:
            counts["no_readable_images"] += 1
            continue
        row = rows.get(pid, {})
        dataset, own_id = str(row.get("dataset") or default_dataset), pid
        if dataset_folders:
            dataset, _, own_id = pid.partition("/")
            if not own_id:
                raise ValueError(f"catalogue {root}: images/{pid} holds views but no dataset folder above it; "
                                 "the release layout is images/<dataset>/<product_id>/")
        check_key(dataset, f"dataset of product {pid!r} in {meta_file}")
        # Candidates are searched within a category: without one, a product competes with its whole dataset.
        counts["without_category"] += not row.get("category")
        products.append(CatalogueProduct(own_id, dataset, views, str(row.get("category") or ""),
                                         str(row.get("gender") or ""), str(row.get("title") or ""),
                                         str(row.get("split") or "")))
    if not products:
        raise ValueError(_nothing_readable(root, folders, rows, counts))
    return Catalogue(products, counts)


def _nothing_readable(root: Path, folders: dict[str, list[Path]], rows: dict[str, dict[str, Any]],
                      counts: Counter) -> str:
    """Why a catalogue holds no product with a readable view, in one line."""
    layout = f"expected {root / 'images'}/<product_id>/*{{{','.join(IMAGE_SUFFIXES)}}}"
    if not folders:
        listed = f" ({len(rows)} products listed in products.jsonl have no folder there)" if rows else ""
        return f"catalogue {root}: images/ holds no image files{listed}; {layout}"
    example = next(p for views in folders.values() for p in views)
    return (f"catalogue {root}: none of its {counts['products_in']} products has a readable image "
            f"({counts['unreadable_views']} files could not be decoded, e.g. {example}); {layout}")


def _rank(seed: int, pid: str) -> str:
    return hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()


def assign_splits(products: list[CatalogueProduct], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """Product-level train/val split, zero overlap: a ``split`` given in ``products.jsonl`` is kept (a
    source's native split); the rest of each dataset is split exactly ``val_fraction`` by a seeded
    hash of the id, so the split never depends on file order or on what a model answered."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: use a fraction in [0, 1)")
    out = {p.product_id: p.split for p in products if p.split}
    free: dict[str, list[str]] = defaultdict(list)
    for p in products:
        if not p.split:
            free[p.dataset].append(p.product_id)
    for ids in free.values():
        ranked = sorted(ids, key=lambda pid: _rank(seed, pid))
        n_val = round(len(ranked) * val_fraction)
        out.update({pid: "val" if i < n_val else "train" for i, pid in enumerate(ranked)})
    return out
