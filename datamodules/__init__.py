"""Dataset schema, shards, converters, the generator, and the Lightning DataModules."""

from .catalogue_data import CatalogueDataModule
from .datamodule import ShardDataModule
from .interfaces import RetrievalData
from .synthetic_datamodule import SyntheticDataModule

__all__ = ["CatalogueDataModule", "RetrievalData", "ShardDataModule", "SyntheticDataModule"]
