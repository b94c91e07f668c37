"""Dataset schema, shards, converters, the generator, and the Lightning DataModules."""

from .datamodule import ShardDataModule, SyntheticDataModule

__all__ = ["ShardDataModule", "SyntheticDataModule"]
