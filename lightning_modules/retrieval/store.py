"""What a searchable product store offers, whatever holds the vectors.

A saved faiss index (``GalleryIndex``), the same index with a change log for a catalogue that
changes while it is served (``MutableGallery``) and a vector database (``MilvusGallery``) are used
by ``cir search``, ``cir serve`` and scripts through these two protocols only, so a caller switches
backend without changing code.

Vectors are unit rows (cosine = inner product). A product is identified by ``(dataset, product_id)``;
a multi-vector store holds several vectors per product (one per view) and scores a query against
a product by MaxSim over them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Hit = tuple[str, float]  # (product id, score), best first


@runtime_checkable
class ProductStore(Protocol):
    """Read side: top-k products of one dataset's gallery per query vector."""

    fingerprint: dict[str, str] | None  # the embedding model's identity (``cir.models.model_fingerprint``)

    def datasets(self) -> list[str]:
        """The dataset names this store holds, sorted."""
        ...

    def count(self, dataset: str) -> int:
        """Products (not vectors) of ``dataset``."""
        ...

    def search(self, queries: Any, k: int, dataset: str | None = None,
               where: Mapping[str, str] | None = None) -> list[list[Hit]]:
        """Top-``k`` products per query row (``[Q, D]``, or ``[Q, V, D]`` with MaxSim for a
        multi-vector query) in ``dataset``'s gallery (the only one when None). ``where``: metadata
        equalities a product must meet (e.g. ``{"category": "dress"}``), where the store keeps them."""
        ...


@runtime_checkable
class WritableStore(ProductStore, Protocol):
    """Write side. A call returns only once its change is durable (a crash after the return loses
    nothing) and the next ``search`` sees it."""

    def upsert(self, dataset: str, ids: Sequence[str], vectors: Any,
               meta: Sequence[Mapping[str, str]] | None = None) -> None:
        """Adds the products, replacing any of the same ``(dataset, id)``. ``vectors``: ``[N, D]``,
        or ``[N, V, D]`` with zero rows for absent views in a multi-vector store."""
        ...

    def delete(self, dataset: str, ids: Sequence[str]) -> int:
        """Removes the products; returns how many were there."""
        ...
