"""The generated dataset as a DataModule: a ``ShardDataModule`` whose folder is written on first use."""

from __future__ import annotations

import logging
from typing import Any

from .datamodule import ShardDataModule
from .shards import read_manifest
from .synthetic import GENERATOR_VERSION, write_synthetic

log = logging.getLogger(__name__)


class SyntheticDataModule(ShardDataModule):
    """The generated multi-view dataset; ``prepare_data`` writes its shards when they are missing, and
    refuses a folder written with other settings or by another version of the generator
    (``synthetic.GENERATOR_VERSION``: version 4 added the query groups and view-incomplete queries).

    Args:
        products: products to generate (train and val together).
        generator_seed: seed of the generator (the data itself, not the loader order).
        val_fraction: share of product families held out for validation.
    """

    def __init__(self, data_dir: str = "data/synthetic", products: int = 1500, generator_seed: int = 0,
                 val_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        # One hparams dict with the loader's and the generator's settings (logged, checkpointed).
        self.save_hyperparameters({**self.hparams, "products": products, "generator_seed": generator_seed,
                                   "val_fraction": val_fraction})

    def prepare_data(self) -> None:
        manifest = self.data_dir / "manifest.json"
        if manifest.is_file():
            source = read_manifest(self.data_dir)["source"]
            wanted = (self.hparams.products, self.hparams.generator_seed, self.hparams.val_fraction,
                      GENERATOR_VERSION)
            found = (source.get("products"), source.get("seed"), source.get("val_fraction"), source.get("version"))
            if found != wanted:
                keys = ("products", "generator_seed", "val_fraction")
                differ = [f"{k}: folder {f}, config {w}"
                          for k, f, w in zip(keys, found, wanted, strict=False) if f != w]
                if found[3] != GENERATOR_VERSION:
                    differ.append(f"generator version: folder {found[3]}, this code {GENERATOR_VERSION}")
                same_settings = found[:3] == wanted[:3]  # only the generator changed: flags cannot help
                flags = ("" if same_settings else
                         f"or pass --data.init_args.products={found[0]} --data.init_args.generator_seed={found[1]} "
                         f"--data.init_args.val_fraction={found[2]}; ")
                raise ValueError(
                    f"{self.data_dir} holds generated data made with other settings ({'; '.join(differ)}). To train "
                    "on that folder as it is, use class_path datamodules.ShardDataModule with "
                    f"data_dir={self.data_dir}; {flags}or delete {self.data_dir} to regenerate."
                )
            return
        log.info("generating %d synthetic products into %s", self.hparams.products, self.data_dir)
        write_synthetic(self.data_dir, products=self.hparams.products, seed=self.hparams.generator_seed,
                        val_fraction=self.hparams.val_fraction)
