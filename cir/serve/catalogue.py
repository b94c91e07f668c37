"""The products of a ``cir index`` catalogue folder, as a service shows them: photos and metadata.

The folder is a layout ``cir index`` reads: ``images/<product_id>/*.jpg`` and an optional
``products.jsonl``, or FashionMV's ``images/<dataset>/<product_id>/``. It is listed once at
start-up: an id is looked up in that listing and never becomes a path, so no id (``../``, absolute
paths, ``%2F``) can name a file outside it. A product's views are its image files in name order,
at most five, as ``cir index`` took them; those that do not decode are left out, as ``cir index``
left them out (each product is checked on first use).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from datamodules.catalogue import readable
from datamodules.catalogue_data import read_view
from datamodules.converters.common import IMAGE_SUFFIXES
from datamodules.schema import MAX_VIEWS

from .gallery import MEDIA_TYPES, UnknownProduct


class CatalogueStore:
    """A catalogue folder's products by id (the dataset a product is served under is the index's)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        images = self.root / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"catalogue {self.root}: no images/ folder (expected images/<product_id>/*.jpg)")
        found: dict[str, list[Path]] = {}
        for path in sorted(images.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(path.parent.relative_to(images).as_posix(), []).append(path)
        self._listed = {pid: sorted(paths, key=lambda p: p.name)[:MAX_VIEWS] for pid, paths in found.items()}
        self._rows: dict[str, dict[str, Any]] = {}
        meta = self.root / "products.jsonl"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # cir index refused a bad line before this index was built
                if isinstance(row, dict) and "product_id" in row:
                    self._rows[str(row["product_id"])] = row
        self._views: dict[str, list[Path]] = {}
        self._lock = threading.Lock()

    def _folder(self, dataset: str, pid: str) -> str | None:
        """The product's folder under images/: its id, or <dataset>/<id> in FashionMV's layout."""
        for key in (pid, f"{dataset}/{pid}"):
            if key in self._listed:
                return key
        return None

    def has(self, dataset: str, pid: str) -> bool:
        return self._folder(dataset, pid) is not None

    def views(self, dataset: str, pid: str) -> list[Path]:
        key = self._folder(dataset, pid)
        if key is None:
            raise UnknownProduct(f"no product {pid!r} in {dataset} (catalogue {self.root})")
        with self._lock:
            if key not in self._views:
                self._views[key] = [p for p in self._listed[key] if readable(p)]
            return self._views[key]

    def source(self, dataset: str, pid: str) -> tuple[list[Any], str]:
        """The product as a query's source: its views read as ``cir index`` read them; no caption
        (a catalogue has none)."""
        return [read_view(p) for p in self.views(dataset, pid)], ""

    def describe(self, dataset: str, pid: str) -> dict[str, Any]:
        views = self.views(dataset, pid)
        row = self._rows.get(pid, {})
        return {"id": pid, "dataset": dataset, "product_id": pid, "category": str(row.get("category") or ""),
                "title": str(row.get("title") or ""), "view_names": [p.stem for p in views],
                "captions": {"short": "", "long": "", "views": [], "query": ""}, "attributes": {},
                "views": len(views)}

    def view_image(self, dataset: str, pid: str, n: int) -> tuple[bytes, str]:
        views = self.views(dataset, pid)
        if not 0 <= n < len(views):
            raise UnknownProduct(f"product {pid!r} of {dataset} has no view {n}")
        return views[n].read_bytes(), MEDIA_TYPES[views[n].suffix.lower().lstrip(".")]
