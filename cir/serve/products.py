"""What the service shows of each product it can return: one view over the products' photos and
metadata, whichever store holds their vectors.

A product exists when the vector store holds it (``contains``/``ids`` where the store can say;
a store that cannot list its products, such as a vector database behind the ``ProductStore``
protocol, defers to the photos). Its photos and metadata are the uploaded ones when it was added
through ``POST /products``, else those of the base: the split's gallery shards (``GalleryStore``)
or a ``cir index`` catalogue folder (``CatalogueStore``).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

from .catalogue import CatalogueStore
from .gallery import GalleryStore, UnknownProduct
from .uploads import UploadStore


class Products:
    def __init__(self, store: Any, base: GalleryStore | CatalogueStore | None,
                 uploads: UploadStore | None = None) -> None:
        self.store, self.base, self.uploads = store, base, uploads
        self._listings: dict[str, list[str]] = {}  # sorted ids per dataset, until the next write
        self._examples: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def changed(self) -> None:
        with self._lock:
            self._listings.clear()

    def _in_base(self, dataset: str, pid: str) -> bool:
        return self.base is not None and self.base.has(dataset, pid)

    def has(self, dataset: str, pid: str) -> bool:
        contains = getattr(self.store, "contains", None)
        if callable(contains):
            return bool(contains(dataset, pid))
        return (self.uploads is not None and self.uploads.has(dataset, pid)) or self._in_base(dataset, pid)

    def ids(self, dataset: str) -> list[str]:
        with self._lock:
            if dataset not in self._listings:
                listed = getattr(self.store, "ids", None)
                if callable(listed):
                    ids = set(listed(dataset))
                else:
                    ids = set(self.uploads.ids(dataset)) if self.uploads else set()
                    if isinstance(self.base, GalleryStore) and dataset in self.base.datasets:
                        ids |= set(self.base.ids(dataset))
                self._listings[dataset] = sorted(ids)
            return self._listings[dataset]

    def _owner(self, dataset: str, pid: str) -> Any:
        """Where the product's photos are; UnknownProduct when the store does not hold it."""
        if not self.has(dataset, pid):
            where = f"the {self.base.split} gallery of {dataset}" if isinstance(self.base, GalleryStore) else dataset
            raise UnknownProduct(f"no product {pid!r} in {where}")
        if self.uploads is not None and self.uploads.has(dataset, pid):
            return self.uploads
        if self.base is None:
            raise UnknownProduct(f"product {pid!r} of {dataset} has no photos on this server")
        return self.base

    def source(self, dataset: str, pid: str) -> tuple[list[Any], str]:
        return self._owner(dataset, pid).source(dataset, pid)

    def source_key(self, dataset: str, pid: str) -> Hashable:
        """Where turn 1 of this product may be cached: new photos under the same id are a new key."""
        entry = self.uploads.get(dataset, pid) if self.uploads is not None else None
        return ("gallery", dataset, pid, entry.version if entry else "")

    def describe(self, dataset: str, pid: str) -> dict[str, Any]:
        return self._owner(dataset, pid).describe(dataset, pid)

    def view_image(self, dataset: str, pid: str, n: int) -> tuple[bytes, str]:
        return self._owner(dataset, pid).view_image(dataset, pid, n)

    def sample(self, dataset: str, pid: str) -> dict[str, Any]:
        """A shard product decoded as the gallery pipeline decodes it."""
        if not isinstance(self.base, GalleryStore):
            raise UnknownProduct(f"product {pid!r} of {dataset} is not in gallery shards")
        return self.base.sample(dataset, pid)

    def examples(self, dataset: str, n: int) -> list[dict[str, Any]]:
        """Queries of the split's triplets; a catalogue has none."""
        if not isinstance(self.base, GalleryStore) or dataset not in self.base.datasets:
            return []
        with self._lock:
            known = self._examples.get((dataset, n))
        if known is None:  # read once: the triplet shards do not change while serving
            known = self.base.examples(dataset, n)
            with self._lock:
                self._examples[(dataset, n)] = known
        return [e for e in known if self.has(dataset, e["source_id"]) and self.has(dataset, e["target_id"])]
