"""Dataset schema, shards, converters, the generator, and the Lightning DataModules."""

from .datamodule import ShardDataModule, SyntheticDataModule
from .interfaces import RetrievalData

__all__ = ["RetrievalData", "ShardDataModule", "SyntheticDataModule"]
