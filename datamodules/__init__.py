"""Dataset schema, shards, converters, the generator, and the Lightning DataModules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .catalogue_data import CatalogueDataModule
    from .datamodule import ShardDataModule
    from .interfaces import RetrievalData
    from .synthetic_datamodule import SyntheticDataModule

_EXPORTS = {
    "CatalogueDataModule": ".catalogue_data",
    "RetrievalData": ".interfaces",
    "ShardDataModule": ".datamodule",
    "SyntheticDataModule": ".synthetic_datamodule",
}
__all__ = ["CatalogueDataModule", "RetrievalData", "ShardDataModule", "SyntheticDataModule"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
